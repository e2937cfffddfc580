"""Part 2 (Fashion-MNIST feed-forward study): the notebook in the quick profile and its part2.json; the
hand-written label-smoothing loss against Keras's built-in one (values, gradients, training path); the
training helpers of dnn.py; and the repeatability of a relu run. The quick profile runs a smaller grid with
fewer seeds (results["protocol"] records which); the committed full-profile results are checked for the
assignment's twelve-network grid and three seeds."""

import dataclasses
import datetime
import itertools
import json
import re

import nbformat
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO_ROOT

NOTEBOOK = REPO_ROOT / "Assignment01_Part2_solution.ipynb"
COMMITTED_RESULTS = REPO_ROOT / "results" / "part2.json"
GRID = set(itertools.product((20, 40), (20, 40), ("sigmoid", "tanh", "relu")))
ACCURACIES = {"val_acc", "test_acc"}
OVER_SEEDS = ACCURACIES | {"val_std", "test_std", "seeds"}


@pytest.fixture(scope="module")
def quick_run(quick_profile_run):
    """The notebook in the quick profile (the session's shared run, see conftest): (results, executed nb)."""
    checkout, proc = quick_profile_run(NOTEBOOK.name)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = checkout / "runs" / "quick"
    results = json.loads((out / "results" / "part2.json").read_text())
    return results, nbformat.read(out / NOTEBOOK.name, as_version=4)


@pytest.mark.notebook
def test_results_have_the_issue_keys(quick_run):
    results, _ = quick_run
    assert set(results) == {
        "baseline", "grid", "seed_repeats", "best", "label_smoothing", "chosen_alpha", "calibration",
        "standard_error", "reproducibility", "protocol", "comparisons", "provenance",
    }  # fmt: skip
    assert set(results["provenance"]) == {"trainings_reused", "trainings_computed"}
    assert set(results["baseline"]) == ACCURACIES | {"epochs", "trainable_parameters"}
    assert results["baseline"]["trainable_parameters"] == 784 * 20 + 20 + 20 * 40 + 40 + 40 * 10 + 10
    assert results["baseline"]["epochs"] >= 1
    assert set(results["best"]) == {"n1", "n2", "act"} | OVER_SEEDS
    for row in results["grid"]:
        assert set(row) == {"n1", "n2", "act"} | ACCURACIES
    for row in results["seed_repeats"]:
        assert set(row) == {"n1", "n2", "act"} | OVER_SEEDS
    for row in results["label_smoothing"]:
        assert set(row) == {"alpha"} | OVER_SEEDS
    rows = [results["baseline"], results["best"], *results["grid"], *results["seed_repeats"]]
    for row in rows + results["label_smoothing"]:
        assert all(0.0 <= row[key] <= 1.0 for key in ACCURACIES)
    protocol = results["protocol"]
    keys = ("optimizer", "learning_rate", "lr_schedule", "batch_size", "max_epochs", "early_stopping", "seed")
    assert set(keys) <= set(protocol), set(keys) - set(protocol)
    assert protocol["profile"] == "quick"


def grid_and_seeds(results):
    """The grid's rows as (n1, n2, act) and the seeds, checked against what results["protocol"] says."""
    protocol = results["protocol"]
    rows = [(row["n1"], row["n2"], row["act"]) for row in results["grid"]]
    axes = protocol["grid"]
    assert len(rows) == len(set(rows)) == len(axes["n1"]) * len(axes["n2"]) * len(axes["act"])
    assert set(rows) == set(itertools.product(axes["n1"], axes["n2"], axes["act"]))
    assert len(results["seed_repeats"]) == protocol["top"]
    for row in results["seed_repeats"] + results["label_smoothing"]:
        assert row["seeds"] == protocol["seeds"]
    return set(rows), protocol["seeds"]


@pytest.mark.notebook
def test_the_quick_grid_and_seeds_are_smaller_but_cover_every_activation(quick_run):
    results, _ = quick_run
    rows, seeds = grid_and_seeds(results)
    assert rows < GRID and {act for *_, act in rows} == {"sigmoid", "tanh", "relu"}
    assert len(seeds) >= 2, "a standard deviation and Welch's test need two seeds"


def test_the_committed_results_have_the_twelve_network_grid_and_three_seeds():
    results = json.loads(COMMITTED_RESULTS.read_text())
    rows, seeds = grid_and_seeds(results)
    assert rows == GRID and len(seeds) == 3 and results["protocol"]["top"] == 3
    assert results["protocol"]["profile"] == "full"


@pytest.mark.parametrize("where", [pytest.param("quick", marks=pytest.mark.notebook), "committed"])
def test_one_configuration_one_number_alpha_0_is_the_chosen_networks_runs(request, where):
    """Question 2.6's alpha = 0 row is Question 2.5's chosen network with its seeds: the same figures."""
    if where == "quick":
        results, _ = request.getfixturevalue("quick_run")
    else:
        results = json.loads(COMMITTED_RESULTS.read_text())
    [plain] = [row for row in results["label_smoothing"] if row["alpha"] == 0.0]
    best = {key: value for key, value in results["best"].items() if key not in ("n1", "n2", "act")}
    assert {key: plain[key] for key in best} == best


@pytest.mark.notebook
def test_the_top_three_are_repeated_over_three_seeds_and_the_best_mean_wins(quick_run):
    results, _ = quick_run
    repeated = {(r["n1"], r["n2"], r["act"]) for r in results["seed_repeats"]}
    assert len(repeated) == results["protocol"]["top"]
    others = [r["val_acc"] for r in results["grid"] if (r["n1"], r["n2"], r["act"]) not in repeated]
    top = [r["val_acc"] for r in results["grid"] if (r["n1"], r["n2"], r["act"]) in repeated]
    assert min(top) >= max(others), "the repeated networks are the grid's top three by validation"
    for row in results["seed_repeats"]:
        assert len(row["seeds"]) == len(set(row["seeds"])) == len(results["protocol"]["seeds"])
        assert row["val_std"] >= 0 and row["test_std"] >= 0
    best_mean = max(r["val_acc"] for r in results["seed_repeats"])
    assert results["best"]["val_acc"] == best_mean
    assert results["best"] in results["seed_repeats"]


@pytest.mark.notebook
def test_label_smoothing_rows_and_the_chosen_alpha(quick_run):
    results, _ = quick_run
    rows = results["label_smoothing"]
    alphas = [row["alpha"] for row in rows]
    assert sorted(a for a in alphas if a > 0) == [0.1, 0.15, 0.2]
    assert alphas.count(0.0) == 1, "alpha = 0 is the baseline row"
    assert len(alphas) == 4
    assert all(row["seeds"] == results["protocol"]["seeds"] for row in rows)
    top = max(row["val_acc"] for row in rows)
    assert results["chosen_alpha"] in [row["alpha"] for row in rows if row["val_acc"] == top]


@pytest.mark.notebook
def test_calibration_figures(quick_run):
    results, _ = quick_run
    assert [row["alpha"] for row in results["calibration"]] == [0.0, 0.1, 0.15, 0.2]
    for row in results["calibration"]:
        assert 0.0 <= row["ece"] <= 1.0 and row["nll"] > 0 and 0.0 < row["confidence"] <= 1.0


@pytest.mark.notebook
def test_executed_notebook_has_no_errors_and_renders_the_answers(quick_run):
    _, nb = quick_run
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    markdown = "".join(o["data"].get("text/markdown", "") for o in outputs if "data" in o)
    assert markdown.count("**Answer: ") == 6, "one answer line each for Questions 2.1 to 2.6"
    assert "answer pending" not in markdown, "every answer slot is filled"
    streams = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert streams.count("pass (") == 3, "the three checks of Appendix A"


QUESTION_HEADING = re.compile(r"^#+\s*Question (2\.\d)\b", re.MULTILINE)


TRAINED_LINE = re.compile(
    r"\*Trained:\* (.+), (\d+ of \d+) epochs, kept epoch (\d+), ([\d.]+) min; "
    r"last epoch: training accuracy ([\d.]+), validation ([\d.]+); on ([\d-]+)\."
)
PROTOCOLS = 5  # Question 2.5's candidate training protocols (the notebook's CANDIDATES, in every profile)


def training_tables(notebook):
    """{(question ("2.4"), title): [row, ...]} of the training records the notebook shows (a
    report.training_table, titled by its first header cell, or a report.training_line, titled "line"), each
    under the last question heading before it; a row is [model, "run of asked", kept, minutes,
    "train / valid", date], as text."""
    tables, question = {}, None
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            question = (QUESTION_HEADING.findall(cell.source) or [question])[-1]
            continue
        for output in cell.get("outputs", []):
            text = "".join(output.get("data", {}).get("text/markdown", ""))
            for line in TRAINED_LINE.finditer(text):
                model, epochs, kept, minutes, train, valid, date = line.groups()
                tables.setdefault((question, "line"), []).append(
                    [model, epochs, kept, minutes, f"{train} / {valid}", date]
                )
            if "| epochs | kept | min |" in text:
                lines = [line for line in text.splitlines() if line.startswith("|")]
                title = lines[0].strip("|").split("|")[0].strip()
                tables.setdefault((question, title), []).extend(
                    [c.strip() for c in line.strip("|").split("|")]
                    for line in lines[2:]  # after the head
                )
    return tables


@pytest.mark.parametrize("where", [pytest.param("quick", marks=pytest.mark.notebook), "committed"])
def test_each_question_shows_the_training_records_of_its_runs(request, where):
    """Question 2.4's run, the protocols and the grid's runs of 2.5 (the top networks' other seeds too) and
    every alpha run of 2.6, one row each under their question: epochs run of those asked for, the kept
    epoch among them, accuracies in [0, 1], a date."""
    if where == "quick":
        results, notebook = request.getfixturevalue("quick_run")
    else:
        results = json.loads(COMMITTED_RESULTS.read_text())
        notebook = nbformat.read(NOTEBOOK, as_version=4)
    tables = training_tables(notebook)
    seed = results["protocol"]["seed"]
    seeds = len(results["protocol"]["seeds"])
    assert {key: len(rows) for key, rows in tables.items()} == {
        ("2.4", "line"): 1,
        ("2.5", f"protocol, seed {seed}"): PROTOCOLS,
        ("2.5", f"grid network, seed {seed}"): len(results["grid"]),
        ("2.5", "grid network, other seeds"): sum(len(row["seeds"]) - 1 for row in results["seed_repeats"]),
        ("2.6", "run"): (len(results["label_smoothing"]) - 1) * seeds,
    }
    for rows in tables.values():
        for _, epochs, kept, minutes, accuracies, trained in rows:
            run, asked = map(int, epochs.split(" of "))
            assert 1 <= int(kept) <= run <= asked and float(minutes) >= 0
            assert all(0.0 <= float(a) <= 1.0 for a in accuracies.split(" / "))
            datetime.date.fromisoformat(trained)
    assert int(tables["2.4", "line"][0][1].split(" of ")[0]) == results["baseline"]["epochs"]


# --- the hand-written loss -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tf_keras():
    import tensorflow as tf
    from tensorflow import keras

    return tf, keras


@pytest.fixture(scope="module")
def loss_class(tf_keras):
    """LabelSmoothingCrossEntropy as the notebook uses it (defined in dnn.py, so that the training cache keys
    its code; the notebook lists its source)."""
    import dnn

    return dnn.LabelSmoothingCrossEntropy


def random_batch(rng, keras, batch, scale, num_classes=10):
    """One-hot labels (batch, K) and float32 logits (batch, K) drawn from N(0, scale^2)."""
    labels = keras.utils.to_categorical(rng.integers(0, num_classes, batch), num_classes)
    return labels, rng.normal(scale=scale, size=(batch, num_classes)).astype("float32")


def keras_smoothing(keras, alpha, **kwargs):
    return keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=alpha, **kwargs)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.15, 0.2, 0.5])
def test_loss_equals_keras_label_smoothing(loss_class, tf_keras, alpha):
    tf, keras = tf_keras
    rng = np.random.default_rng(int(alpha * 100))
    for scale in (0.5, 3.0, 20.0):
        labels, logits = random_batch(rng, keras, 128, scale)
        ours = loss_class(alpha, reduction=None)(labels, logits).numpy()
        theirs = keras_smoothing(keras, alpha, reduction=None)(labels, logits).numpy()
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-5)
        mean_ours = float(loss_class(alpha)(labels, logits))
        assert abs(mean_ours - float(keras_smoothing(keras, alpha)(labels, logits))) < 1e-5


@settings(max_examples=25, deadline=None)
@given(
    alpha=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**32 - 1),
    batch=st.integers(1, 64),
    num_classes=st.integers(2, 12),
)
def test_loss_equals_keras_label_smoothing_property(loss_class, tf_keras, alpha, seed, batch, num_classes):
    tf, keras = tf_keras
    labels, logits = random_batch(np.random.default_rng(seed), keras, batch, 4.0, num_classes)
    ours = loss_class(alpha, reduction=None)(labels, logits).numpy()
    theirs = keras_smoothing(keras, alpha, reduction=None)(labels, logits).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-5)


def test_smoothing_changes_the_loss(loss_class, tf_keras):
    """alpha > 0 is not plain cross-entropy: a confident correct prediction is penalised."""
    tf, keras = tf_keras
    labels = np.eye(10, dtype="float32")[[3, 7]]
    logits = np.log(0.001 + 0.99 * labels)  # softmax: 0.991 on the true class, 0.001 elsewhere
    plain = float(loss_class(0.0)(labels, logits))
    np.testing.assert_allclose(plain, -np.log(0.991), atol=1e-6)
    smoothed = float(loss_class(0.2)(labels, logits))
    np.testing.assert_allclose(smoothed, -(0.82 * np.log(0.991) + 9 * 0.02 * np.log(0.001)), atol=1e-5)


@pytest.mark.parametrize("alpha", [-0.1, 1.0, 1.5])
def test_loss_rejects_alpha_outside_0_1(loss_class, alpha):
    with pytest.raises(ValueError, match="alpha"):
        loss_class(alpha)


# --- the training path ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_splits(tf_keras):
    """4,000 training, 1,000 validation and 1,000 test images of Fashion-MNIST, scaled as in the notebook."""
    import dnn

    _, keras = tf_keras
    (x, y), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
    x, x_test = ((a.reshape(len(a), 784) / 255.0).astype("float32") for a in (x, x_test))
    return dnn.Splits(x[:4000], y[:4000], x[4000:5000], y[4000:5000], x_test[:1000], y_test[:1000])


def test_loss_gradients_through_the_network_equal_keras(loss_class, tf_keras, small_splits):
    """The gradient of the hand-written loss with respect to every weight of the network is Keras's."""
    import dnn

    tf, keras = tf_keras
    keras.utils.set_random_seed(0)
    network = dnn.build_mlp(40, 20, "relu", "he_normal")
    x, labels = small_splits.x_train[:256], dnn.one_hot(small_splits.y_train[:256])
    for alpha in (0.0, 0.1, 0.2):
        with tf.GradientTape(persistent=True) as tape:
            logits = network(x, training=True)
            ours, theirs = loss_class(alpha)(labels, logits), keras_smoothing(keras, alpha)(labels, logits)
        for g_ours, g_theirs in zip(
            tape.gradient(ours, network.trainable_variables),
            tape.gradient(theirs, network.trainable_variables),
        ):
            np.testing.assert_allclose(g_ours.numpy(), g_theirs.numpy(), rtol=0, atol=1e-6)


def test_training_with_the_loss_follows_keras(loss_class, tf_keras, small_splits):
    """model.fit with the hand-written loss and with Keras's, same seed, 16 steps: the same losses and
    weights up to float32 rounding; and smoothing (alpha 0.2 against 0) trains to other weights."""
    import dnn

    _, keras = tf_keras
    first = dataclasses.replace(
        small_splits, x_train=small_splits.x_train[:1000], y_train=small_splits.y_train[:1000]
    )
    protocol = dnn.Protocol(max_epochs=1)
    runs = {
        (alpha, which): dnn.run_experiment(40, 20, "relu", protocol, first, loss=loss, progress=False)
        for alpha in (0.0, 0.2)
        for which, loss in (("ours", loss_class(alpha)), ("keras", keras_smoothing(keras, alpha)))
    }
    for alpha in (0.0, 0.2):
        ours, theirs = runs[(alpha, "ours")], runs[(alpha, "keras")]
        np.testing.assert_allclose(ours.history["loss"], theirs.history["loss"], rtol=0, atol=1e-5)
        for a, b in zip(ours.model.get_weights(), theirs.model.get_weights()):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    plain, smoothed = runs[(0.0, "ours")].model.get_weights(), runs[(0.2, "ours")].model.get_weights()
    assert max(np.abs(a - b).max() for a, b in zip(plain, smoothed)) > 1e-3


# --- repeatability --------------------------------------------------------------------------------------


def test_a_relu_run_repeats_bit_for_bit_in_one_process(small_splits):
    """The same short relu run twice in this process gives identical weights and histories; a third run
    from another seed does not (so the comparison can see a difference)."""
    import dnn

    protocol = dnn.Protocol(
        lr_schedule="cosine", max_epochs=2, early_stopping_patience=2, initializer="he_normal"
    )
    first, second, other_seed = (
        dnn.run_experiment(40, 40, "relu", protocol, small_splits, seed=seed, progress=False)
        for seed in (1234, 1234, 1235)
    )
    assert first.history == second.history
    assert all(np.array_equal(a, b) for a, b in zip(first.model.get_weights(), second.model.get_weights()))
    assert not all(
        np.array_equal(a, b) for a, b in zip(first.model.get_weights(), other_seed.model.get_weights())
    )


# --- dnn.py ------------------------------------------------------------------------------------------


def test_bad_settings_are_refused():
    import dnn

    with pytest.raises(ValueError, match="act"):
        dnn.build_mlp(20, 40, "softplus")
    with pytest.raises(ValueError, match="n1 and n2"):
        dnn.build_mlp(0, 40, "relu")
    with pytest.raises(ValueError, match="optimizer"):
        dnn.Protocol(optimizer="sgd")
    with pytest.raises(ValueError, match="lr_schedule"):
        dnn.Protocol(lr_schedule="linear")
    with pytest.raises(ValueError, match="max_epochs"):
        dnn.Protocol(max_epochs=0)


def test_calibration_of_known_predictions():
    """Confidence 0.8 everywhere, right on 80% of the images: ECE 0; right on 50%: ECE 0.3."""
    import dnn

    probs = np.full((10, 10), 0.2 / 9, dtype="float32")
    probs[:, 0] = 0.8
    labels = np.array([0] * 8 + [1, 2])
    measured = dnn.calibration(probs, labels)
    assert measured["ece"] == pytest.approx(0.0, abs=1e-6)
    assert measured["nll"] == pytest.approx(-(8 * np.log(0.8) + 2 * np.log(0.2 / 9)) / 10, rel=1e-5)
    assert dnn.calibration(probs, np.array([0] * 5 + [1] * 5))["ece"] == pytest.approx(0.3, abs=1e-6)


def test_seed_summary_and_standard_error():
    import dnn

    runs = [
        dnn.Run(None, {}, v, t, 30, e, 1.0, s) for v, t, e, s in [(0.88, 0.87, 20, 1), (0.89, 0.88, 25, 2)]
    ]
    summary = dnn.seed_summary(runs)
    assert summary["val_acc"] == pytest.approx(0.885) and summary["val_std"] == pytest.approx(
        0.00707, abs=1e-5
    )
    assert summary["seeds"] == [1, 2] and summary["best_epoch"] == 22.5
    assert dnn.mean_std(summary, "test_acc") == "0.8750 ± 0.0071"
    assert dnn.accuracy_standard_error(0.88, 6000) == pytest.approx(0.004195, abs=1e-6)


def test_layer_table_counts_the_networks_parameters_not_the_optimizers_slots(small_splits):
    """After training, Keras's summary adds Adam's two slots per weight (50,852 in all); the table keeps the
    network's own 784*20+20 + 20*40+40 + 40*10+10 = 16,950."""
    import dnn

    run = dnn.run_experiment(20, 40, "relu", dnn.Protocol(max_epochs=1), small_splits, progress=False)
    table = dnn.layer_table(run.model)
    assert table["parameters"].to_dict() == {"hidden_1": 15700, "hidden_2": 840, "logits": 410}
    optimizer_slots = sum(int(np.prod(v.shape)) for v in run.model.optimizer.variables)
    assert optimizer_slots > 2 * table["parameters"].sum()


def test_seed_table_shows_each_seed_and_its_kept_epoch():
    import dnn

    runs = [
        dnn.Run(None, {}, v, t, 30, e, 1.0, s) for v, t, e, s in [(0.88, 0.87, 20, 1), (0.89, 0.88, 25, 2)]
    ]
    table = dnn.seed_table({"net": runs}, "network")
    assert table.loc["net"].to_dict() == {
        "validation (mean ± std)": "0.8850 ± 0.0071",
        "test (mean ± std)": "0.8750 ± 0.0071",
        "validation per seed": "0.8800 / 0.8900",
        "kept epoch per seed": "20 / 25",
    }
