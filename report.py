"""What the three notebooks share: the setup block and the training-curve plot.

``start_notebook`` must run before TensorFlow is imported: it imports TensorFlow itself with its C++
start-up lines (absl, CUDA probing, the oneDNN notice) silenced, which would otherwise show in red
under the first cell that imports it.
"""

import json
import os
from pathlib import Path
from types import SimpleNamespace

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
