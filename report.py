"""What the three notebooks share: the setup block, the training-curve plot, a stopwatch and McNemar's test.

``start_notebook`` must run before TensorFlow is imported: it imports TensorFlow itself with its C++
start-up lines (absl, CUDA probing, the oneDNN notice) silenced, which would otherwise show in red
under the first cell that imports it.
"""

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np

PROFILES = ("full", "quick")


def start_notebook(profile, output_dir="", student_id=None):
    """The first cell of every notebook.

    Checks ``profile`` ("full": the assignment's settings, written into the project; "quick": tiny
    subsets, written into runs/quick/), silences TensorFlow's start-up logging, creates the output
    folders and shows the Student Information block from student.json (``student_id`` overrides the
    file's). Returns a namespace with ``out``, ``results`` and ``models`` (Paths) and ``student``
    (dict). Raises ValueError for an unknown profile.
    """
    if profile not in PROFILES:
        raise ValueError(f"PROFILE={profile!r}; allowed: {', '.join(map(repr, PROFILES))}.")
    _import_tensorflow_quietly()
    out = Path(output_dir or ("." if profile == "full" else "runs/quick"))
    paths = SimpleNamespace(out=out, results=out / "results", models=out / "models")
    for folder in (paths.results, paths.models):
        folder.mkdir(parents=True, exist_ok=True)
    paths.student = json.loads(Path("student.json").read_text())
    if student_id is not None:
        paths.student["student_id"] = student_id
    from IPython.display import Markdown, display

    s = paths.student
    display(
        Markdown(
            f"""## Student Information
**Surname:** {s["surname"]} <br>
**Firstname:** {s["first_name"]} <br>
**Student ID:** {s["student_id"]} <br>
**Email:** {s["email"]} <br>
**Your tutorial time:** {s["tutorial_time"]}"""
        )
    )
    return paths


def _import_tensorflow_quietly():
    """Imports TensorFlow and probes its devices with the process's stderr (file descriptor 2) sent
    to /dev/null: its C++ start-up lines are written before any log-level setting applies
    (TF_CPP_MIN_LOG_LEVEL does not stop them). Python-side warnings (e.g. "legacy .h5 format") and
    retracing notes are turned down to errors."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf

        tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)
    tf.get_logger().setLevel("ERROR")


def plot_histories(histories, title, metrics=("accuracy", "loss"), best_epochs=None):
    """Training curves of one or more runs, side by side per metric: train solid, validation dashed.

    ``histories``: {label: Keras-style history dict with ``metric`` and ``val_<metric>`` lists};
    ``best_epochs``: {label: 1-based epoch whose weights were kept}, marked with a dotted line.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (label, history), color in zip(histories.items(), colors * len(histories)):
        epochs = range(1, len(history["loss"]) + 1)
        for ax, metric in zip(axes[0], metrics):
            ax.plot(epochs, history[metric], color=color, label=f"{label} train")
            ax.plot(epochs, history[f"val_{metric}"], color=color, ls="--", label=f"{label} valid")
            if best_epochs and best_epochs.get(label):
                ax.axvline(best_epochs[label], color=color, ls=":", lw=1)
    for ax, metric in zip(axes[0], metrics):
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{title}: {metric}")
        ax.legend(fontsize=8)
    plt.tight_layout()
    plt.show()


class Stopwatch:
    """Seconds spent per named section: ``with clock("3.8 attacks"): ...`` adds to
    ``clock.seconds["3.8 attacks"]`` (a section may be timed in several pieces)."""

    def __init__(self):
        self.seconds = {}

    @contextmanager
    def __call__(self, section):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[section] = self.seconds.get(section, 0.0) + time.perf_counter() - started


def mcnemar(correct_a, correct_b, alpha=0.05):
    """McNemar's exact test of two classifiers on the same examples.

    ``correct_a``, ``correct_b``: (N,) bools, is each classifier right on each example. Only the
    discordant examples count: ``a_only`` (A right, B wrong) and ``b_only``; under the null
    hypothesis that both are equally accurate each discordant example is a fair coin, so the
    two-sided p-value is that of a binomial test of ``a_only`` out of ``a_only + b_only`` at 1/2.
    Returns a namespace with ``a_only``, ``b_only``, ``difference`` (accuracy of A minus B),
    ``p_value`` and ``significant`` (p < ``alpha``).
    """
    from scipy.stats import binomtest

    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"correct_a and correct_b must be 1-D and of one length, got {a.shape} and {b.shape}."
        )
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    p_value = binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    return SimpleNamespace(
        a_only=a_only,
        b_only=b_only,
        difference=float(a.mean() - b.mean()),
        p_value=float(p_value),
        significant=bool(p_value < alpha),
    )


def significance(test):
    """The verdict of ``mcnemar`` in words, e.g. "not significant (McNemar p = 0.41; 12 vs 9 discordant
    images)": A right and B wrong on 12 images, the other way round on 9."""
    verdict = "significant" if test.significant else "not significant"
    return f"{verdict} (McNemar p = {test.p_value:.2g}; {test.a_only} vs {test.b_only} discordant images)"
