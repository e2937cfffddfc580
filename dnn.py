"""The Part 2 study's training helpers: the feed-forward network of Questions 2.4 to 2.6, one training run
with a stated protocol, repeats over seeds, the measures the notebook reports (standard error of an
accuracy, calibration) and their plots.

Arrays: images are (n, 784) float32 pixels in [0, 1]; labels are (n,) integers in 0..9 (one-hot (n, 10)
where a loss needs them). The network outputs logits (n, 10): the softmax of the architecture's last layer
is applied by the loss (log-softmax, from logits) and by ``predict_proba``.

Run as ``python -m dnn JOB.json`` it trains one network in a fresh process (``train_in_fresh_process``).
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf
from tensorflow import keras

NUM_CLASSES = 10
ACTIVATIONS = ("sigmoid", "tanh", "relu")
OPTIMIZERS = ("adam",)
LR_SCHEDULES = ("constant", "cosine", "plateau")
STEPS_PER_EXECUTION = 32  # batches per TensorFlow call: the same updates, less Python overhead per batch


@dataclasses.dataclass(frozen=True)
class Splits:
    """The training, validation and test sets: ``x_*`` (n, 784) float32 in [0, 1], ``y_*`` (n,) ints 0..9."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_valid: np.ndarray
    y_valid: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def save(self, path):
        """All six arrays into one ``.npz`` file (for a run in another process)."""
        np.savez(path, **dataclasses.asdict(self))

    @classmethod
    def load(cls, path):
        with np.load(path) as arrays:
            return cls(**{name: arrays[name] for name in arrays.files})


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How a network is trained.

    ``lr_schedule``: "constant"; "cosine" (decays ``learning_rate`` to 0 over ``max_epochs``); or
    "plateau" (halves it when the validation loss has not improved for 2 epochs).
    ``early_stopping_patience``: None keeps the weights of the last epoch; an integer stops after that many
    epochs without a better validation accuracy and restores the weights of the best epoch (patience =
    ``max_epochs`` trains every epoch and keeps the best one).
    """

    optimizer: str = "adam"
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    batch_size: int = 64
    max_epochs: int = 20
    early_stopping_patience: int | None = None
    initializer: str = "glorot_uniform"

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not (isinstance(self.max_epochs, int) and self.max_epochs > 0):
            raise ValueError(f"max_epochs must be a positive integer, got {self.max_epochs!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size > 0):
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")


@dataclasses.dataclass
class Run:
    """One trained network: ``history`` is Keras's per-epoch dict; ``best_epoch`` (1-based) is the epoch
    whose weights ``model`` holds and that ``val_acc`` and ``test_acc`` (in [0, 1]) measure."""

    model: keras.Model
    history: dict
    val_acc: float
    test_acc: float
    epochs: int
    best_epoch: int
    seconds: float
    seed: int


def build_mlp(n1, n2, act, initializer="glorot_uniform"):
    """The network 784 -> n1 (act) -> n2 (act) -> 10 (softmax), weights drawn by ``initializer``.

    Input (batch, 784) pixels in [0, 1]; output (batch, 10) logits. The last layer's softmax is applied
    by the loss (from logits) and by ``predict_proba``."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if not all(isinstance(n, int) and n > 0 for n in (n1, n2)):
        raise ValueError(f"n1 and n2 must be positive integers, got {n1!r}, {n2!r}")
    return keras.Sequential(
        [
            keras.Input(shape=(28 * 28,)),
            keras.layers.Dense(n1, activation=act, kernel_initializer=initializer, name="hidden_1"),
            keras.layers.Dense(n2, activation=act, kernel_initializer=initializer, name="hidden_2"),
            keras.layers.Dense(NUM_CLASSES, kernel_initializer=initializer, name="logits"),
        ],
        name=f"mlp_{n1}_{n2}_{act}",
    )


class LabelSmoothingCrossEntropy(keras.losses.Loss):
    """Cross-entropy against the smoothed targets (1 - alpha) * y_true + alpha / K, from logits
    (Question 2.6). y_true: (batch, K) one-hot; y_pred: (batch, K) logits. Per example:
    -sum_k target_k * log_softmax(y_pred)_k."""

    def __init__(self, alpha=0.1, name="label_smoothing_cross_entropy", **kwargs):
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha!r}")
        super().__init__(name=name, **kwargs)
        self.alpha = float(alpha)

    def call(self, y_true, y_pred):
        logits = tf.convert_to_tensor(y_pred)
        y_true = tf.cast(y_true, logits.dtype)
        num_classes = tf.cast(tf.shape(y_true)[-1], logits.dtype)
        targets = (1.0 - self.alpha) * y_true + self.alpha / num_classes
        return -tf.reduce_sum(targets * tf.nn.log_softmax(logits, axis=-1), axis=-1)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha}


def one_hot(labels):
    """(n,) ints in 0..9 -> (n, 10) float32 one-hot rows."""
    return keras.utils.to_categorical(labels, NUM_CLASSES).astype("float32")


def predict_proba(model, x):
    """Class probabilities (n, 10), rows summing to 1: the softmax of the network's logits on ``x``."""
    return keras.ops.convert_to_numpy(keras.ops.softmax(model.predict(x, verbose=0), axis=-1))


def layer_table(model):
    """One row per layer of a built network: ``layer``, ``units``, ``activation`` and ``parameters`` (its
    trainable weights and biases; the optimizer's slots are not the network's parameters)."""
    return pd.DataFrame(
        [
            {
                "layer": layer.name,
                "units": layer.units,
                "activation": keras.activations.serialize(layer.activation),
                "parameters": int(sum(np.prod(w.shape) for w in layer.trainable_weights)),
            }
            for layer in model.layers
        ]
    ).set_index("layer")


class EpochBar(keras.callbacks.Callback):
    """A progress bar over the epochs of one run, redrawn in place while the run trains and emptied when it
    ends, so that the saved notebook keeps no bars (the results tables say what the runs reached)."""

    def __init__(self, desc, epochs):
        super().__init__()
        self.desc, self.epochs = desc, epochs

    def _draw(self, done, logs=None):
        from tqdm import tqdm

        shown = {"loss": "loss", "accuracy": "acc", "val_accuracy": "val_acc"}
        postfix = ", ".join(f"{shown[k]}={v:.4f}" for k, v in (logs or {}).items() if k in shown)
        meter = tqdm.format_meter(
            done,
            self.epochs,
            time.time() - self.start,
            ncols=125,
            prefix=self.desc,
            unit="epoch",
            postfix=postfix or None,
        )
        return {"text/plain": meter}

    def on_train_begin(self, logs=None):
        from IPython.display import display

        self.start = time.time()
        self.handle = display(self._draw(0), raw=True, display_id=True)

    def on_epoch_end(self, epoch, logs=None):
        self.handle.update(self._draw(epoch + 1, logs), raw=True)

    def on_train_end(self, logs=None):
        self.handle.update({"text/plain": ""}, raw=True)


def make_optimizer(protocol, steps_per_epoch):
    """The protocol's optimizer (Adam), with the cosine schedule over ``max_epochs`` where it asks for one."""
    lr = protocol.learning_rate
    if protocol.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=steps_per_epoch * protocol.max_epochs)
    return keras.optimizers.Adam(learning_rate=lr)


def run_experiment(n1, n2, act, protocol, splits, loss=None, seed=1234, desc="", progress=True):
    """Seed (Python, NumPy, TensorFlow), build 784-n1-n2-10, train on ``splits``' training set with
    ``protocol``, evaluate on the validation and test sets.

    ``loss``: a Keras loss on (batch, 10) one-hot targets and (batch, 10) logits; default the categorical
    cross-entropy from logits. Returns a ``Run``."""
    keras.utils.set_random_seed(seed)
    model = build_mlp(n1, n2, act, protocol.initializer)
    steps_per_epoch = math.ceil(len(splits.x_train) / protocol.batch_size)
    model.compile(
        optimizer=make_optimizer(protocol, steps_per_epoch),
        loss=loss or keras.losses.CategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        steps_per_execution=STEPS_PER_EXECUTION,
    )
    callbacks = [EpochBar(desc or model.name, protocol.max_epochs)] if progress else []
    if protocol.early_stopping_patience is not None:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_accuracy", patience=protocol.early_stopping_patience, restore_best_weights=True
            )
        )
    if protocol.lr_schedule == "plateau":
        callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2))
    valid = (splits.x_valid, one_hot(splits.y_valid))
    start = time.time()
    history = model.fit(
        splits.x_train,
        one_hot(splits.y_train),
        batch_size=protocol.batch_size,
        epochs=protocol.max_epochs,
        validation_data=valid,
        callbacks=callbacks,
        verbose=0,
    ).history
    seconds = time.time() - start
    epochs = len(history["loss"])
    kept_best = protocol.early_stopping_patience is not None
    return Run(
        model=model,
        history=history,
        val_acc=float(model.evaluate(*valid, verbose=0)[1]),
        test_acc=float(model.evaluate(splits.x_test, one_hot(splits.y_test), verbose=0)[1]),
        epochs=epochs,
        best_epoch=int(np.argmax(history["val_accuracy"])) + 1 if kept_best else epochs,
        seconds=seconds,
        seed=seed,
    )


def seed_summary(runs):
    """Mean and standard deviation (n - 1 in the denominator) of the validation and test accuracies of
    runs that differ only in their seed, with the seeds and the mean epoch kept."""
    val = np.array([r.val_acc for r in runs])
    test = np.array([r.test_acc for r in runs])
    return {
        "val_acc": float(val.mean()),
        "val_std": float(val.std(ddof=1)) if len(runs) > 1 else 0.0,
        "test_acc": float(test.mean()),
        "test_std": float(test.std(ddof=1)) if len(runs) > 1 else 0.0,
        "seeds": [r.seed for r in runs],
        "best_epoch": float(np.mean([r.best_epoch for r in runs])),
    }


def mean_std(summary, key):
    """'0.8873 ± 0.0012': the mean ``summary[key]`` ("val_acc" or "test_acc") of a ``seed_summary`` and its
    standard deviation."""
    return f"{summary[key]:.4f} ± {summary[key.replace('_acc', '_std')]:.4f}"


def seed_table(runs, index):
    """One row per entry of ``runs`` ({label: [Run, ...] differing only in the seed}), the index named
    ``index``: validation and test accuracy (mean ± std over the seeds), the validation accuracy of each
    seed and the epoch each seed's kept weights come from."""
    rows = []
    for label, seed_runs in runs.items():
        summary = seed_summary(seed_runs)
        rows.append(
            {
                index: label,
                "validation (mean ± std)": mean_std(summary, "val_acc"),
                "test (mean ± std)": mean_std(summary, "test_acc"),
                "validation per seed": " / ".join(f"{r.val_acc:.4f}" for r in seed_runs),
                "kept epoch per seed": " / ".join(str(r.best_epoch) for r in seed_runs),
            }
        )
    return pd.DataFrame(rows).set_index(index)


def accuracy_standard_error(accuracy, n):
    """Standard error sqrt(p (1 - p) / n) of an accuracy ``p`` in [0, 1] measured on ``n`` images."""
    return math.sqrt(accuracy * (1.0 - accuracy) / n)


def reliability(probs, labels, bins=15):
    """The top probability of each prediction binned into ``bins`` equal-width bins on [0, 1].

    ``probs`` (n, 10) rows summing to 1, ``labels`` (n,) ints. A DataFrame with one row per non-empty bin:
    ``low``, ``high`` (its edges), ``count``, ``confidence`` (mean top probability) and ``accuracy``."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    rows = [
        {
            "low": b / bins,
            "high": (b + 1) / bins,
            "count": int(np.sum(which == b)),
            "confidence": float(confidence[which == b].mean()),
            "accuracy": float(correct[which == b].mean()),
        }
        for b in range(bins)
        if np.any(which == b)
    ]
    return pd.DataFrame(rows)


def calibration(probs, labels, bins=15):
    """How well the probabilities ``probs`` (n, 10) match the labels (n,) ints: a dict with

    ``ece`` (expected calibration error: sum over the bins of ``reliability`` of count / n times
    |accuracy - confidence|, in [0, 1]), ``nll`` (mean of -ln p[label]), ``confidence`` (mean top
    probability) and ``accuracy``."""
    table = reliability(probs, labels, bins)
    n = len(labels)
    p_true = probs[np.arange(n), np.asarray(labels)]
    return {
        "ece": float(np.sum(table["count"] / n * (table["accuracy"] - table["confidence"]).abs())),
        "nll": float(-np.mean(np.log(np.maximum(p_true, np.finfo(probs.dtype).tiny)))),
        "confidence": float(probs.max(axis=1).mean()),
        "accuracy": float(np.mean(probs.argmax(axis=1) == np.asarray(labels))),
    }


# --- plots ----------------------------------------------------------------------------------------


def plot_grid_heatmap(grid, title):
    """Validation accuracy of the grid as a heatmap: rows n1-n2, columns the activation. Each cell shows
    its validation accuracy and, below it, its test accuracy, in black or white, whichever stands out on
    that cell's colour. ``grid``: a DataFrame with columns n1, n2, act, val_acc, test_acc."""
    import matplotlib.pyplot as plt

    grid = grid.assign(sizes=grid["n1"].astype(str) + "-" + grid["n2"].astype(str))
    acts = [act for act in ACTIVATIONS if act in set(grid["act"])]
    heat, test = (
        grid.pivot(index="sizes", columns="act", values=key)[acts] for key in ("val_acc", "test_acc")
    )
    fig, ax = plt.subplots(figsize=(6.5, 0.8 + 0.6 * heat.shape[0]))
    image = ax.imshow(heat.values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(heat.shape[1]), heat.columns)
    ax.set_yticks(range(heat.shape[0]), heat.index)
    ax.set_xlabel("activation")
    ax.set_ylabel("hidden units n1-n2")
    for r in range(heat.shape[0]):
        for c in range(heat.shape[1]):
            red, green, blue, _ = image.cmap(image.norm(heat.values[r, c]))
            light = 0.299 * red + 0.587 * green + 0.114 * blue > 0.5  # perceived brightness of the cell
            label = f"{heat.values[r, c]:.4f}\n(test {test.values[r, c]:.4f})"
            ax.text(c, r, label, ha="center", va="center", fontsize=10, color="black" if light else "white")
    fig.colorbar(image, ax=ax, label="validation accuracy")
    ax.set_title(title)
    ax.grid(False)
    plt.tight_layout()
    plt.show()


def plot_validation_curves(runs, title):
    """Validation accuracy per epoch of several runs ({label: Run}), each run's kept epoch marked."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 3.2))
    for label, run in runs.items():
        curve = run.history["val_accuracy"]
        (line,) = ax.plot(range(1, len(curve) + 1), curve, label=f"{label} (kept epoch {run.best_epoch})")
        ax.plot(run.best_epoch, curve[run.best_epoch - 1], "o", color=line.get_color(), ms=7)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.legend(fontsize=9, loc="lower right")
    plt.tight_layout()
    plt.show()


def plot_reliability(curves, title, bins=15):
    """Reliability diagram: accuracy against mean confidence per bin (left) and how many test images fall
    in each bin (right), for each {label: (probs (n, 10), labels (n,))}."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.3))
    left.plot([0, 1], [0, 1], color="grey", ls=":", label="perfect calibration")
    for label, (probs, labels) in curves.items():
        table = reliability(probs, labels, bins)
        ece = calibration(probs, labels, bins)["ece"]
        left.plot(table["confidence"], table["accuracy"], "o-", label=f"{label} (ECE {ece:.4f})")
        right.bar(table["low"], table["count"], width=1 / bins, align="edge", alpha=0.5, label=label)
    left.set_xlabel("mean top probability in the bin (confidence)")
    left.set_ylabel("accuracy in the bin")
    left.set_xlim(0, 1)
    left.set_ylim(0, 1)
    left.legend(fontsize=9)
    left.set_title(f"{title}: reliability")
    right.set_xlabel("top probability (confidence)")
    right.set_ylabel("test images")
    right.set_yscale("log")
    right.legend(fontsize=9)
    right.set_title(f"{title}: confidence histogram")
    plt.tight_layout()
    plt.show()


# --- a run in a fresh process (the reproducibility check) -------------------------------------------


def widest_instruction_set(cpuinfo="/proc/cpuinfo"):
    """This CPU's widest vector instruction set as oneDNN sees it: "AVX-512", "AVX2", "below AVX2", or
    "unknown" where ``cpuinfo`` (Linux's CPU description) cannot be read."""
    try:
        flags = next(
            line for line in Path(cpuinfo).read_text().splitlines() if line.startswith("flags")
        ).split()
    except (OSError, StopIteration):
        return "unknown"
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "below AVX2"


def train_in_fresh_process(n1, n2, act, protocol, splits, seed, env=None, threads=None):
    """``run_experiment`` (default loss, no progress bar) in a new Python process, with the environment
    variables ``env`` added to this one's (e.g. another ONEDNN_MAX_CPU_ISA) and, if ``threads`` is given,
    that many TensorFlow intra-op threads. Returns dict(val_acc, test_acc, best_epoch, weights (list of
    arrays, as ``model.get_weights()``)); raises RuntimeError with the child's stderr if it fails."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        splits.save(folder / "splits.npz")
        job = {
            "n1": n1,
            "n2": n2,
            "act": act,
            "protocol": dataclasses.asdict(protocol),
            "seed": seed,
            "threads": threads,
            "folder": str(folder),
        }
        (folder / "job.json").write_text(json.dumps(job))
        child_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
        proc = subprocess.run(
            [sys.executable, "-m", "dnn", str(folder / "job.json")],
            cwd=Path(__file__).resolve().parent,
            env=child_env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"the run in a fresh process failed:\n{proc.stderr[-3000:]}")
        result = json.loads((folder / "result.json").read_text())
        with np.load(folder / "weights.npz") as saved:
            result["weights"] = [saved[f"w{i}"] for i in range(len(saved.files))]
    return result


def repeat_in_fresh_process(run, net, protocol, splits, seed, env=None, threads=None):
    """The notebook's ``run`` of network ``net`` = (n1, n2, act) trained again by ``train_in_fresh_process``
    (same protocol, splits and seed; ``env`` and ``threads`` as there), and how far the two ended apart:
    a dict with ``val_acc``, ``test_acc`` and ``best_epoch`` ([this run's, the repeat's]),
    ``max_weight_difference`` (largest absolute difference of any weight) and ``test_predictions_changed``
    (test images whose predicted class differs)."""
    other = train_in_fresh_process(*net, protocol, splits, seed, env=env, threads=threads)
    twin = build_mlp(*net, protocol.initializer)
    twin.set_weights(other["weights"])
    predictions = [m.predict(splits.x_test, verbose=0).argmax(axis=1) for m in (run.model, twin)]
    return {
        "val_acc": [round(run.val_acc, 4), round(other["val_acc"], 4)],
        "test_acc": [round(run.test_acc, 4), round(other["test_acc"], 4)],
        "best_epoch": [run.best_epoch, other["best_epoch"]],
        "max_weight_difference": max(
            float(np.abs(a - b).max()) for a, b in zip(run.model.get_weights(), other["weights"])
        ),
        "test_predictions_changed": int(np.sum(predictions[0] != predictions[1])),
    }


def _train_job(job_path):
    """The child's side of ``train_in_fresh_process``: read the job, train, write result and weights."""
    import tensorflow as tf

    job = json.loads(Path(job_path).read_text())
    if job["threads"]:
        tf.config.threading.set_intra_op_parallelism_threads(job["threads"])
    folder = Path(job["folder"])
    run = run_experiment(
        job["n1"],
        job["n2"],
        job["act"],
        Protocol(**job["protocol"]),
        Splits.load(folder / "splits.npz"),
        seed=job["seed"],
        progress=False,
    )
    np.savez(folder / "weights.npz", **{f"w{i}": w for i, w in enumerate(run.model.get_weights())})
    result = {"val_acc": run.val_acc, "test_acc": run.test_acc, "best_epoch": run.best_epoch}
    (folder / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _train_job(sys.argv[1])
