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
    "augmentation": {"with", "without", "runs"},
    "combined": {"mixup_alpha", "val_acc", "test_acc", "model", "epochs_run"},
    "mixup": {"alpha", "val_acc", "test_acc", "model", "runs"},
    "attacks": {"model", "clean", "fgsm", "pgd", "mim"},
    "adversarial": {"model", "clean", "fgsm", "pgd", "mim"},
    "sam": {"rho", "val_acc", "test_acc", "model", "seconds_per_epoch"},
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
    assert "test_acc" in results["augmentation"]["without"]
    assert {"test_acc", "epochs_run", "model"} <= set(results["augmentation"]["with"])
    grid = results["grid"]
    assert len(grid) == 12
    combos = {(row["num_blocks"], row["use_skip"], row["learning_rate"]) for row in grid}
    assert combos == {(b, s, lr) for b in (2, 3, 4) for s in (True, False) for lr in (1e-3, 1e-4)}
    best = max(grid, key=lambda row: row["val_acc"])
    assert (best["num_blocks"], best["use_skip"], best["learning_rate"]) == (
        results["best"]["num_blocks"],
        results["best"]["use_skip"],
        results["best"]["learning_rate"],
    )
    assert len(results["mixup"]["runs"]) >= 3  # alpha = 0 and at least two alphas
    # 3.8 attacks the candidate with the best validation accuracy of any epoch (one basis for all runs)
    candidates = results["candidates"]
    for candidate in candidates:
        assert {"best_val_acc", "best_epoch", "last_val_acc", "kept_epoch", "val_acc"} <= set(candidate)
        assert candidate["best_val_acc"] >= candidate["last_val_acc"]
    assert max(candidates, key=lambda c: c["best_val_acc"])["path"] == results["attacks"]["model"]
    for key in ("skip", "sam"):
        assert 0 <= min(results[key]["mcnemar_p"].values()) <= max(results[key]["mcnemar_p"].values()) <= 1


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
    for entry in ("best", "mixup", "combined", "attacks", "adversarial", "sam"):
        path = Path(results[entry]["model"])
        assert path.parts[:2] == ("runs", "quick"), (entry, path)
        assert (checkout / path).is_file(), entry
    assert {run["patience"] for run in results["augmentation"]["runs"]} == {1, 2}
    assert {run["variant"] for run in results["adversarial"]["runs"]} == {"plain", "augmented"}
    for name in (
        "Part3_Sec3_4_best",
        "Part3_Sec3_6_augmented",
        "Part3_Sec3_7_mixup",
        "Part3_Sec3_9_robust",
        "Part3_Sec3_10_sam",
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
        (results["augmentation"]["with"]["model"], results["augmentation"]["with"]["test_acc"]),
        (results["mixup"]["model"], results["mixup"]["test_acc"]),
        (results["combined"]["model"], results["combined"]["test_acc"]),
        *[(run["model"], run["test_acc"]) for run in results["augmentation"]["runs"]],
        (results["sam"]["model"], results["sam"]["test_acc"]),
        (results["adversarial"]["model"], results["adversarial"]["clean"]),
        (results["attacks"]["model"], results["attacks"]["clean"]),
    ]
    for path, recorded in checks:
        model = keras.models.load_model(ROOT / path, compile=False)
        accuracy = attacks.robust_accuracy(model, X_test, y_test, None)
        assert accuracy == pytest.approx(recorded, abs=1e-9), path
    robust = keras.models.load_model(ROOT / results["adversarial"]["model"], compile=False)
    pgd = attacks.robust_accuracy(robust, X_test, y_test, attacks.pgd_attack, eps=0.0313, k=20, eta=0.002)
    assert pgd == pytest.approx(results["adversarial"]["pgd"], abs=1e-9)
