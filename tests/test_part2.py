"""Part 2 (Fashion-MNIST feed-forward study): the notebook in the quick profile, its part2.json, and the
hand-written label-smoothing loss against Keras's built-in one."""

import itertools
import json

import nbformat
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO_ROOT

NOTEBOOK = REPO_ROOT / "Assignment01_Part2_solution.ipynb"
GRID = set(itertools.product((20, 40), (20, 40), ("sigmoid", "tanh", "relu")))
ACCURACIES = {"val_acc", "test_acc"}


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
    assert set(results) == {"baseline", "grid", "best", "label_smoothing", "protocol"}
    assert set(results["baseline"]) == ACCURACIES | {"epochs"}
    assert results["baseline"]["epochs"] >= 1
    assert set(results["best"]) == {"n1", "n2", "act"} | ACCURACIES
    for row in results["grid"]:
        assert set(row) == {"n1", "n2", "act"} | ACCURACIES
    for row in results["label_smoothing"]:
        assert set(row) == {"alpha"} | ACCURACIES
    for row in [results["baseline"], results["best"], *results["grid"], *results["label_smoothing"]]:
        assert all(0.0 <= row[key] <= 1.0 for key in ACCURACIES)
    protocol = results["protocol"]
    keys = ("optimizer", "learning_rate", "lr_schedule", "batch_size", "max_epochs", "early_stopping", "seed")
    assert set(keys) <= set(protocol), set(keys) - set(protocol)
    assert protocol["profile"] == "quick"


@pytest.mark.notebook
def test_grid_has_twelve_distinct_rows(quick_run):
    results, _ = quick_run
    rows = [(row["n1"], row["n2"], row["act"]) for row in results["grid"]]
    assert len(rows) == 12
    assert set(rows) == GRID


@pytest.mark.notebook
def test_best_is_the_argmax_of_validation_accuracy(quick_run):
    results, _ = quick_run
    top = max(row["val_acc"] for row in results["grid"])
    winners = [row for row in results["grid"] if row["val_acc"] == top]
    assert results["best"] in winners


@pytest.mark.notebook
def test_label_smoothing_rows(quick_run):
    results, _ = quick_run
    alphas = [row["alpha"] for row in results["label_smoothing"]]
    assert sorted(a for a in alphas if a > 0) == [0.1, 0.15, 0.2]
    assert alphas.count(0.0) == 1, "alpha = 0 is the baseline row"
    assert len(alphas) == 4


@pytest.mark.notebook
def test_executed_notebook_has_no_errors_and_renders_the_observation(quick_run):
    _, nb = quick_run
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    markdown = "".join(o["data"].get("text/markdown", "") for o in outputs if "data" in o)
    assert "**Observation.**" in markdown


# --- the hand-written loss -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tf_keras():
    import tensorflow as tf
    from tensorflow import keras

    return tf, keras


@pytest.fixture(scope="module")
def loss_class(tf_keras):
    """LabelSmoothingCrossEntropy as the committed notebook defines it (its cell executed on its own)."""
    tf, keras = tf_keras
    cells = [
        c.source
        for c in nbformat.read(NOTEBOOK, as_version=4).cells
        if c.cell_type == "code" and "class LabelSmoothingCrossEntropy" in c.source
    ]
    assert len(cells) == 1, "exactly one cell defines the loss"
    namespace = {"tf": tf, "keras": keras}
    exec(compile(cells[0], "notebook-cell", "exec"), namespace)
    return namespace["LabelSmoothingCrossEntropy"]


def random_batch(rng, keras, batch, scale, num_classes=10):
    """One-hot labels (batch, K) and softmax probabilities (batch, K) of N(0, scale^2) logits."""
    labels = keras.utils.to_categorical(rng.integers(0, num_classes, batch), num_classes)
    logits = rng.normal(scale=scale, size=(batch, num_classes))
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return labels, (probs / probs.sum(axis=1, keepdims=True)).astype("float32")


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.15, 0.2, 0.5])
def test_loss_equals_keras_label_smoothing(loss_class, tf_keras, alpha):
    tf, keras = tf_keras
    rng = np.random.default_rng(int(alpha * 100))
    for scale in (0.5, 3.0, 20.0):
        labels, probs = random_batch(rng, keras, 128, scale)
        ours = loss_class(alpha, reduction=None)(labels, probs).numpy()
        keras_loss = keras.losses.CategoricalCrossentropy(label_smoothing=alpha, reduction=None)
        theirs = keras_loss(labels, probs).numpy()
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
        assert (
            abs(
                float(loss_class(alpha)(labels, probs))
                - float(keras.losses.CategoricalCrossentropy(label_smoothing=alpha)(labels, probs))
            )
            < 1e-6
        )


@settings(max_examples=25, deadline=None)
@given(
    alpha=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**32 - 1),
    batch=st.integers(1, 64),
    num_classes=st.integers(2, 12),
)
def test_loss_equals_keras_label_smoothing_property(loss_class, tf_keras, alpha, seed, batch, num_classes):
    tf, keras = tf_keras
    labels, probs = random_batch(np.random.default_rng(seed), keras, batch, 4.0, num_classes)
    ours = loss_class(alpha, reduction=None)(labels, probs).numpy()
    keras_loss = keras.losses.CategoricalCrossentropy(label_smoothing=alpha, reduction=None)
    theirs = keras_loss(labels, probs).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


def test_smoothing_changes_the_loss(loss_class, tf_keras):
    """alpha > 0 is not plain cross-entropy: a confident correct prediction is penalised."""
    tf, keras = tf_keras
    labels = np.eye(10, dtype="float32")[[3, 7]]
    probs = 0.001 + 0.99 * labels  # 0.991 on the true class, 0.001 elsewhere
    plain = float(loss_class(0.0)(labels, probs))
    np.testing.assert_allclose(plain, -np.log(0.991), atol=1e-6)
    smoothed = float(loss_class(0.2)(labels, probs))
    np.testing.assert_allclose(smoothed, -(0.82 * np.log(0.991) + 9 * 0.02 * np.log(0.001)), atol=1e-5)


@pytest.mark.parametrize("alpha", [-0.1, 1.0, 1.5])
def test_loss_rejects_alpha_outside_0_1(loss_class, alpha):
    with pytest.raises(ValueError, match="alpha"):
        loss_class(alpha)
