"""Part 3 notebook: the quick profile runs end to end and records every key; the committed models
reproduce the accuracies that results/part3.json records on the real test split."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "Assignment01_Part3_solution.ipynb"
RESULTS = ROOT / "results" / "part3.json"
ANIMALS_DIR = Path(os.environ.get("ANIMALS_DIR", ROOT / "datasets" / "Animals"))

REQUIRED = {
    "split": {"y_test_sha256", "n_train", "n_valid", "n_test", "classes"},
    "default": {"test_acc"},
    "skip": {"with", "without"},
    "best": {"num_blocks", "use_skip", "learning_rate", "val_acc", "test_acc", "model"},
    "augmentation": {"with", "without", "neighbour_difference"},
    "mixup": {"alpha", "base", "val_acc", "test_acc", "model"},
    "recipe": {"base", "val_acc", "test_acc", "model"},
    "attacks": {"model", "clean", "fgsm", "pgd", "mim"},
    "adversarial": {
        "model",
        "init_from",
        "best_epoch",
        "tolerance",
        "clean",
        "fgsm",
        "pgd",
        "mim",
        "pgd_strong",
        "pgd_restarts_acc",
        "worst_case",
    },
    "sam": {"rho", "val_acc", "test_acc", "model", "seconds_per_epoch", "runs", "baseline_sharpness"},
    "best_clean": {"name", "val_acc", "test_acc", "model", "test_acc_flip_tta"},
    "apgd": {"library", "eps", "iterations", "targets", "models"},
    "sam_variant": {
        "design",
        "runs",
        "protocol",
        "verdicts",
        "head_to_head",
        "saved_fraction_of_sam_extra_time",
    },
}

needs_animals = pytest.mark.skipif(
    not ANIMALS_DIR.is_dir(), reason=f"Animals data not found at {ANIMALS_DIR} (set ANIMALS_DIR)"
)


def check_keys(results):
    for key, subkeys in REQUIRED.items():
        assert key in results, key
        assert subkeys <= set(results[key]), (key, subkeys - set(results[key]))
    for side in ("with", "without"):
        assert {"val_acc", "test_acc"} <= set(results["skip"][side])
        assert {"val_acc", "test_acc", "epochs_run", "kept_epoch", "model"} <= set(
            results["augmentation"][side]
        )
    grid = results["grid"]
    combos = {(row["num_blocks"], row["use_skip"], row["learning_rate"]) for row in grid}
    if results["profile"] == "full":
        assert combos == {(b, s, lr) for b in (2, 3, 4) for s in (True, False) for lr in (1e-3, 1e-4)}
    else:  # the quick profile's smaller grid still holds the two cells Question 3.3 reuses
        assert {(2, True, 1e-3), (2, False, 1e-3)} <= combos and len(combos) == len(grid)
    best = max(grid, key=lambda row: row["val_acc"])
    assert (best["num_blocks"], best["use_skip"], best["learning_rate"]) == (
        results["best"]["num_blocks"],
        results["best"]["use_skip"],
        results["best"]["learning_rate"],
    )
    # validation picks every model: 3.8 attacks the top candidate, SAM's rho, the best clean model
    candidates = results["candidates"]
    assert max(candidates, key=lambda c: c["val_acc"])["model"] == results["attacks"]["model"]
    runs = results["sam"]["runs"]
    assert {run["rho"] for run in runs} == {0.05, 0.1}
    assert max(runs, key=lambda run: run["val_acc"])["rho"] == results["sam"]["rho"]
    top = max(results["clean_models"], key=lambda c: c["val_acc"])
    assert (top["model"], top["test_acc"]) == (
        results["best_clean"]["model"],
        results["best_clean"]["test_acc"],
    )
    assert results["best_clean_test_acc"] == top["test_acc"]
    assert {c["model"] for c in candidates} <= {c["model"] for c in results["clean_models"]} | {
        results["best"]["model"]
    }
    adversarial = results["adversarial"]
    assert adversarial["val_pgd_acc"] >= adversarial["best_val_pgd_acc"] - adversarial["tolerance"] - 1e-9
    comparisons = results["comparisons"]
    for key in (
        "3.3 skip, validation",
        "3.6 augmentation, validation",
        "3.7 mixup, validation",
        "weight averaging, validation",
        "3.9 adversarial training, PGD",
        "3.9 PGD-20 against the restarts"
        if results["profile"] == "full"
        else "3.9 PGD-2 against the restarts",
        "3.10 SAM rho=0.05, validation",
        "3.10 SAM rho=0.1, validation",
        "levers: largest validation gain",
    ):
        assert key in comparisons, key
    assert all(0 <= c["p_value"] <= 1 for c in comparisons.values() if c["kind"] == "comparison")
    # the SAM study: every arm of its design from every seed, among the clean models, not in the summary
    variant = results["sam_variant"]
    arms, seeds = variant["design"]["arms"], {run["seed"] for run in variant["runs"]}
    assert len(variant["runs"]) == len(arms) * len(seeds)
    assert {run["run"] for run in variant["runs"]} == {arm["label"] for arm in arms}
    for verdict in variant["verdicts"].values():  # each verdict is the committed rule applied to its records
        pgd, validation = comparisons[verdict["pgd"]], comparisons[verdict["validation"]]
        assert verdict["meets_rule"] == (pgd["direction"] == "gain" and validation["direction"] != "loss")
    assert len(results["levers"]) == 8
    assert len(results["summary"]) == len(results["clean_models"]) - len(variant["runs"]) + 1
    # the worst case over every attack can only fall when APGD joins it, and is below each attack alone
    for name, scores in results["apgd"]["models"].items():
        assert scores["worst_case"] <= min(
            scores["worst_case_without_apgd"], scores["apgd_ce"], scores["pgd"]
        ), name
    assert (
        results["adversarial"]["worst_case_with_apgd"]
        == results["apgd"]["models"]["adversarially trained"]["worst_case"]
    )


@pytest.mark.notebook
@needs_animals
def test_quick_profile_records_every_key(quick_profile_run):
    """The session's shared quick-profile run (see conftest): every key, every model under runs/quick/."""
    checkout, proc = quick_profile_run(NOTEBOOK.name)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = checkout / "runs" / "quick"
    results = json.loads((out / "results" / "part3.json").read_text())
    assert results["profile"] == "quick"
    check_keys(results)
    for entry in ("best", "mixup", "recipe", "attacks", "adversarial", "sam", "best_clean"):
        path = Path(results[entry]["model"])
        assert path.parts[:2] == ("runs", "quick"), (entry, path)
        assert (checkout / path).is_file(), entry
    for name in (
        "Part3_Sec3_4_best",
        "Part3_Sec3_6_no_augmentation",
        "Part3_Sec3_6_augmentation",
        "Part3_Sec3_7_mixup",
        "Part3_recipe",
        "Part3_Sec3_9_robust",
        "Part3_Sec3_10_sam_rho0.05",
        "Part3_Sec3_10_sam_rho0.1",
    ):
        assert (out / "models" / f"{name}.h5").is_file(), name


committed = pytest.mark.skipif(not RESULTS.is_file(), reason="results/part3.json not committed yet")


@committed
def test_committed_results_have_every_key():
    results = json.loads(RESULTS.read_text())
    assert results["profile"] == "full"
    check_keys(results)
    assert (results["split"]["n_train"], results["split"]["n_valid"], results["split"]["n_test"]) == (
        4000,
        500,
        500,
    )


@pytest.mark.slow
@committed
@needs_animals
def test_committed_models_reproduce_recorded_accuracies():
    """Loads each committed model and recomputes, on the real test split, the accuracies recorded."""
    from tensorflow import keras

    import attacks
    import models

    results = json.loads(RESULTS.read_text())
    manager = models.AnimalsDatasetManager([models.SimplePreprocessor(32, 32)])
    manager.load(models.create_label_folder_dict(str(ANIMALS_DIR)))
    manager.process_data_label()
    manager.train_valid_test_split()
    X_test, y_test = manager.X_test, manager.y_test
    assert (
        hashlib.sha256(np.asarray(y_test, np.int64).tobytes()).hexdigest()
        == results["split"]["y_test_sha256"]
    )

    checks = [
        (results["best"]["model"], results["best"]["test_acc"]),
        *[
            (results["augmentation"][side]["model"], results["augmentation"][side]["test_acc"])
            for side in ("with", "without")
        ],
        (results["mixup"]["model"], results["mixup"]["test_acc"]),
        (results["recipe"]["model"], results["recipe"]["test_acc"]),
        *[(run["model"], run["test_acc"]) for run in results["sam"]["runs"]],
        *[(c["model"], c["test_acc"]) for c in results["clean_models"]],
        (results["adversarial"]["model"], results["adversarial"]["clean"]),
        (results["attacks"]["model"], results["attacks"]["clean"]),
    ]
    recorded = {}  # model file -> every test accuracy results/part3.json records for it
    for path, value in checks:
        recorded.setdefault(path, []).append(value)
    loaded = {}  # each file is loaded and evaluated once, then checked against all its records
    for path, values in recorded.items():
        loaded[path] = keras.models.load_model(ROOT / path, compile=False)
        accuracy = attacks.robust_accuracy(loaded[path], X_test, y_test, None)
        for value in values:
            assert accuracy == pytest.approx(value, abs=1e-9), path
    tta = float(np.mean(models.predict_flip_tta(loaded[results["best_clean"]["model"]], X_test) == y_test))
    assert tta == pytest.approx(results["best_clean"]["test_acc_flip_tta"], abs=1e-9)
    robust = loaded[results["adversarial"]["model"]]
    pgd = attacks.robust_accuracy(robust, X_test, y_test, attacks.pgd_attack, eps=0.0313, k=20, eta=0.002)
    assert pgd == pytest.approx(results["adversarial"]["pgd"], abs=1e-9)
