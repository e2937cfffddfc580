"""Assignment01_Part1_solution.ipynb against an independent TensorFlow/Keras computation.

The notebook is run with papermill in the quick profile into a temporary folder for two student IDs other
than the committed one, and every value of its ``part1.json`` is compared with a forward pass built from
Keras ``Dense`` layers and ``tf.GradientTape`` here (nothing is imported from the notebook). Its activation
derivatives (the cell tagged ``activations``) are checked against automatic differentiation on a grid of
negative, zero and positive inputs, and the committed ``results/part1.json`` against student ID 1234.
"""

import json
import os
from pathlib import Path

import nbformat
import numpy as np
import papermill as pm
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402
from tensorflow import keras  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "Assignment01_Part1_solution.ipynb"
COMMITTED_RESULTS = REPO_ROOT / "results" / "part1.json"
COMMITTED_STUDENT_ID = 1234
# 31234567: a typical 8-digit ID (every pre-activation positive, the true class 3 is predicted);
# 55: the first pre-activation is negative (Leaky ReLU's 0.01 branch) and the prediction (class 1) is wrong.
STUDENT_IDS = (None, 31234567)  # None: the session's shared quick run, with student.json's ID

SLOPE, ETA, ALPHA = 0.01, 0.01, 0.1
RTOL, ATOL = 1e-9, 1e-12
# fmt: off
SHAPES = {
    "q1_2": {
        "h1": (4, 1), "h2": (3, 1), "h3": (3, 1), "p": (3, 1), "ce_loss": (), "label_smoothing_loss": (),
    },
    "q1_3": {
        "student_id": (), "h1_bar": (4, 1), "h1": (4, 1), "p": (3, 1), "predicted_class": (), "loss": (),
        "dh2": (3, 1), "dW2": (3, 4), "db2": (3, 1), "dh1": (4, 1), "dh1_bar": (4, 1), "dW1": (4, 3),
        "db1": (4, 1), "W1_new": (4, 3), "b1_new": (4, 1), "W2_new": (3, 4), "b2_new": (3, 1),
    },
}
# fmt: on


# ----------------------------------------------------------------------------------------------------------
# Independent reference: Keras Dense layers on row vectors (kernel = W^T), float64 throughout.


def dense(W, b, activation=None):
    """A float64 Keras Dense layer holding W (out, in) and b (out, 1); it maps rows (1, in) to (1, out)."""
    layer = keras.layers.Dense(W.shape[0], activation=activation, dtype="float64")
    layer.build((None, W.shape[1]))
    layer.set_weights([W.T, b[:, 0]])
    return layer


def leaky_relu_tf(z):
    """Leaky ReLU as defined (0.01 z for z < 0, z otherwise); tf.nn.leaky_relu would round 0.01 to float32."""
    return tf.where(z < 0, SLOPE * z, z)


def column(t):
    """A (1, n) row tensor as an (n, 1) NumPy column."""
    return np.asarray(t).T


def reference_q1_2():
    """Question 1.2 by Keras: ReLU Dense layers, softmax, CE and label-smoothed CE from the logits."""
    W1 = np.array([[1, -1, 1], [1, 1, -1], [2, -1, 2], [-1, -2, 1]], dtype=float)
    b1 = np.array([[1], [0], [1], [0]], dtype=float)
    W2 = np.array([[1, -1, -1, 2], [1, -1, 1, -1], [-1, 2, -1, 2]], dtype=float)
    b2 = np.array([[1], [1], [0]], dtype=float)
    W3 = np.array([[1, -2, 1], [1, 2, -1], [-1, 1, -1]], dtype=float)
    b3 = np.zeros((3, 1))
    x = tf.constant([[1.0, -1.0, 1.0]], tf.float64)
    h1 = dense(W1, b1, "relu")(x)
    h2 = dense(W2, b2, "relu")(h1)
    h3 = dense(W3, b3)(h2)
    target = tf.one_hot([1], 3, dtype=tf.float64)  # y = 2, 1-based
    ce = keras.losses.CategoricalCrossentropy(from_logits=True, dtype="float64")(target, h3)
    smoothed = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=ALPHA, dtype="float64")
    ls = smoothed(target, h3)
    return {
        "h1": column(h1),
        "h2": column(h2),
        "h3": column(h3),
        "p": column(keras.activations.softmax(h3)),
        "ce_loss": float(ce),
        "label_smoothing_loss": float(ls),
    }


def reference_q1_3(student_id):
    """Question 1.3 by Keras layers and tf.GradientTape, for the template's parameters of `student_id`."""
    rng = np.random.RandomState(student_id)  # the stream that np.random.seed(student_id) resets
    W1, b1, W2, b2 = rng.rand(4, 3), rng.rand(4, 1), rng.rand(3, 4), rng.rand(3, 1)
    layer1, layer2 = dense(W1, b1), dense(W2, b2)
    x = tf.constant([[1.0, -1.0, 1.5]], tf.float64)
    with tf.GradientTape() as tape:
        h1_bar = layer1(x)
        h1 = leaky_relu_tf(h1_bar)
        h2 = layer2(h1)
        cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
        loss = cross_entropy(tf.constant([2]), h2)
    watched = {"dh2": h2, "dh1": h1, "dh1_bar": h1_bar, "dW1": layer1.kernel, "db1": layer1.bias}
    g = tape.gradient(loss, {**watched, "dW2": layer2.kernel, "db2": layer2.bias})
    dW1, dW2 = np.asarray(g["dW1"]).T, np.asarray(g["dW2"]).T  # kernels are (in, out)
    db1, db2 = np.asarray(g["db1"])[:, None], np.asarray(g["db2"])[:, None]
    p = column(keras.activations.softmax(h2))
    return {
        "student_id": student_id,
        "h1_bar": column(h1_bar),
        "h1": column(h1),
        "p": p,
        "predicted_class": int(p.argmax()) + 1,
        "loss": float(loss),
        "dh2": column(g["dh2"]),
        "dW2": dW2,
        "db2": db2,
        "dh1": column(g["dh1"]),
        "dh1_bar": column(g["dh1_bar"]),
        "dW1": dW1,
        "db1": db1,
        "W1_new": W1 - ETA * dW1,
        "b1_new": b1 - ETA * db1,
        "W2_new": W2 - ETA * dW2,
        "b2_new": b2 - ETA * db2,
    }


def assert_matches(results, reference):
    """Every key of `reference` equals the notebook's value, with the notebook's shape."""
    assert set(results) == set(reference)
    for key, expected in reference.items():
        actual = np.asarray(results[key], dtype=float)
        assert actual.shape == np.shape(expected), (key, actual.shape, np.shape(expected))
        np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL, err_msg=key)


# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=STUDENT_IDS, ids=lambda sid: f"student{sid or 'json'}")
def quick_run(request, tmp_path_factory, quick_profile_run):
    """Run the notebook (quick profile) for one student ID; return the ID and its part1.json. The ID of
    student.json is the session's shared quick run (conftest), which writes into a copy of the project."""
    if request.param is None:
        checkout, proc = quick_profile_run(NOTEBOOK.name)
        assert proc.returncode == 0, proc.stderr[-3000:]
        student_id = json.loads((REPO_ROOT / "student.json").read_text())["student_id"]
        return student_id, json.loads((checkout / "runs" / "quick" / "results" / "part1.json").read_text())
    out = tmp_path_factory.mktemp(f"part1_{request.param}")
    committed_before = COMMITTED_RESULTS.read_bytes() if COMMITTED_RESULTS.exists() else None
    pm.execute_notebook(
        str(NOTEBOOK),
        str(out / "executed.ipynb"),
        parameters=dict(PROFILE="quick", OUTPUT_DIR=str(out), STUDENT_ID=request.param),
        cwd=str(REPO_ROOT),
        kernel_name="python3",
        progress_bar=False,
    )
    committed_after = COMMITTED_RESULTS.read_bytes() if COMMITTED_RESULTS.exists() else None
    assert committed_after == committed_before, "a quick run must not touch the committed results"
    return request.param, json.loads((out / "results" / "part1.json").read_text())


@pytest.mark.notebook
def test_results_have_the_issue_keys_and_shapes(quick_run):
    _, results = quick_run
    assert set(results) == set(SHAPES)
    for part, shapes in SHAPES.items():
        assert set(results[part]) == set(shapes), part
        for key, shape in shapes.items():
            assert np.shape(results[part][key]) == shape, (part, key)
    assert isinstance(results["q1_3"]["student_id"], int)
    assert isinstance(results["q1_3"]["predicted_class"], int)


@pytest.mark.notebook
def test_q1_2_matches_keras(quick_run):
    _, results = quick_run
    assert_matches(results["q1_2"], reference_q1_2())


@pytest.mark.notebook
def test_q1_3_matches_gradient_tape(quick_run):
    student_id, results = quick_run
    assert_matches(results["q1_3"], reference_q1_3(student_id))


def test_committed_results_are_for_student_1234():
    results = json.loads(COMMITTED_RESULTS.read_text())
    assert results["q1_3"]["student_id"] == COMMITTED_STUDENT_ID
    assert_matches(results["q1_2"], reference_q1_2())
    assert_matches(results["q1_3"], reference_q1_3(COMMITTED_STUDENT_ID))


def test_committed_notebook_is_executed_in_the_full_profile():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata["papermill"]["parameters"]["PROFILE"] == "full"
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code_cells)
    assert not [o for c in code_cells for o in c.outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for c in code_cells for o in c.outputs), "the activation plot"


def notebook_cell(tag):
    """The names defined by the notebook's one code cell tagged `tag`, run with NumPy as `np`."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1
    namespace = {"np": np}
    exec(cells[0].source, namespace)
    return namespace


def notebook_activations():
    """The notebook's activation functions and derivatives: its cell tagged `activations`."""
    return notebook_cell("activations")


def test_appendix_check_passes_within_and_fails_beyond_its_fixed_tolerance(capsys):
    check = notebook_cell("helpers")["check"]
    check("within", [[1.0], [2.0]], tf.constant([[1.0], [2.0 + 5e-13]], tf.float64), 1e-12)
    line = capsys.readouterr().out
    assert line.rstrip().endswith("<= 1e-12: pass") and "5.0e-13" in line, line
    with pytest.raises(AssertionError, match="exceeds the tolerance 1e-12"):
        check("beyond", [1.0, 2.0], [1.0, 2.0 + 3e-12], 1e-12)
    assert capsys.readouterr().out.rstrip().endswith("> 1e-12: FAIL")
    with pytest.raises(AssertionError, match="shape"):
        check("shapes", np.zeros((3, 1)), np.zeros((1, 3)), 1.0)


def test_activation_derivatives_match_autodiff():
    f = notebook_activations()
    x = np.unique(np.concatenate([np.linspace(-8.0, 8.0, 1601), [-50.0, -1e-3, 0.0, 1e-3, 50.0]]))
    assert (x < 0).any() and (x == 0).any() and (x > 0).any()
    xt = tf.constant(x, tf.float64)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xt)
        leaky = leaky_relu_tf(xt)
        softplus = tf.math.softplus(xt)
    with np.errstate(over="raise", divide="raise", invalid="raise"):  # underflow to 0 is fine
        leaky_grad, softplus_grad = tape.gradient(leaky, xt).numpy(), tape.gradient(softplus, xt).numpy()
        np.testing.assert_allclose(f["leaky_relu"](x), leaky.numpy(), rtol=0, atol=1e-15)
        np.testing.assert_allclose(f["leaky_relu_grad"](x), leaky_grad, rtol=0, atol=1e-15)
        np.testing.assert_allclose(f["softplus"](x), softplus.numpy(), rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(f["softplus_grad"](x), softplus_grad, rtol=1e-14, atol=1e-15)
        # the kink: the notebook's convention is the 'otherwise' branch (slope 1), which is also what autodiff
        # of the definition gives; Softplus' = sigmoid, 1/2 at 0; no overflow far out
        assert f["leaky_relu_grad"](0.0) == 1.0 and f["leaky_relu_grad"](-1e-300) == SLOPE
        assert f["softplus_grad"](0.0) == 0.5
        assert np.isfinite(f["softplus"](np.array([-800.0, 800.0]))).all()
        np.testing.assert_allclose(f["softplus_grad"](np.array([-800.0, 800.0])), [0.0, 1.0], atol=1e-300)


@pytest.mark.notebook
@pytest.mark.parametrize(
    "parameters",
    [dict(PROFILE="medium"), dict(PROFILE="quick", STUDENT_ID=-1)],
    ids=["unknown-profile", "negative-student-id"],
)
def test_bad_parameters_raise_value_error(parameters, tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match="ValueError"):
        pm.execute_notebook(
            str(NOTEBOOK),
            str(tmp_path / "executed.ipynb"),
            parameters=dict(OUTPUT_DIR=str(tmp_path), **parameters),
            cwd=str(REPO_ROOT),
            kernel_name="python3",
            progress_bar=False,
        )
