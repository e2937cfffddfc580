"""What the three notebooks share: the setup block, the training-curve plot, a stopwatch and McNemar's test.

``start_notebook`` must run before TensorFlow is imported: it imports TensorFlow itself with its C++
start-up lines (absl, CUDA probing, the oneDNN notice) silenced, which would otherwise show in red
under the first cell that imports it.
"""

import json
import os
import re
import time
import unicodedata
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np

PROFILES = ("full", "quick")


def start_notebook(profile, output_dir="", student_id=None):
    """The first cell of every notebook.

    Checks ``profile`` ("full": the assignment's settings, written into the project; "quick": tiny
    subsets, written into runs/quick/) and student.json (``read_student``; ``student_id``, if given,
    replaces the file's ID after the same check), silences TensorFlow's start-up logging and creates the
    output folders. The Student Information block is a Markdown cell of the notebook, written from
    student.json by tools/personalise.py (`make student`), not an output. Returns a namespace with ``out``,
    ``results`` and ``models`` (Paths) and ``student`` (dict). Raises ValueError for an unknown profile or
    a bad student.json or ID, and FileNotFoundError for a missing student.json, before the slow
    TensorFlow import.
    """
    if profile not in PROFILES:
        raise ValueError(f"PROFILE={profile!r}; allowed: {', '.join(map(repr, PROFILES))}.")
    student = read_student()
    if student_id is not None:
        student["student_id"] = check_student_id(student_id)
    _import_tensorflow_quietly()
    out = Path(output_dir or ("." if profile == "full" else "runs/quick"))
    paths = SimpleNamespace(out=out, results=out / "results", models=out / "models", student=student)
    for folder in (paths.results, paths.models):
        folder.mkdir(parents=True, exist_ok=True)
    return paths


STUDENT_KEYS = ("surname", "first_name", "student_id", "email", "tutorial_time")
# What a text field of student.json may not hold, and why: the notebooks' Markdown (MathJax) reads "$" and
# "\\" as the start of a formula, and a line break or other control character would split the block's line.
# Every other character is shown as typed (tools/personalise.py escapes what Markdown and HTML would read).
NOT_IN_TEXT = {
    "$": "a formula delimiter in the notebooks' Markdown",
    "\\": "a formula and escape character in the notebooks' Markdown",
}
LINE_BREAKING = ("Cc", "Zl", "Zp")  # Unicode categories: control characters, line and paragraph separators


def read_student(path="student.json"):
    """The student's details from ``path``: a dict with ``STUDENT_KEYS``, the text fields (surname,
    first_name, email, tutorial_time) as typed and ``student_id`` an int (``check_student_id``).

    Raises FileNotFoundError naming the file and what to do when it is missing (the notebooks run from
    the project folder, which holds it), and ValueError, one line naming the file, the key, the value and
    what is allowed, for malformed JSON, a missing or empty key, a text field that is not text or holds
    "$", "\\" or a control character (a line break), or a bad ID. Keys beyond ``STUDENT_KEYS`` are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found in {Path.cwd()}: run the notebook from the folder that holds student.json "
            "(the project or the unzipped submission), or create it with the keys surname, first_name, "
            "student_id, email and tutorial_time."
        )
    try:
        student = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(
            f"{path} is not valid JSON (UTF-8 text): {error}; write it as "
            '{"surname": "...", "first_name": "...", "student_id": 12345678, "email": "...", '
            '"tutorial_time": "..."}'
        ) from None
    if not isinstance(student, dict):
        raise ValueError(f"{path} must hold one JSON object with the keys {', '.join(STUDENT_KEYS)}")
    missing = [key for key in STUDENT_KEYS if key not in student]
    if missing:
        raise ValueError(f"{path} has no {', '.join(missing)}: it needs the keys {', '.join(STUDENT_KEYS)}")
    try:
        student_id = check_student_id(student["student_id"])
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    details = {key: _check_text(path, key, student[key]) for key in STUDENT_KEYS if key != "student_id"}
    return {**details, "student_id": student_id}


def _check_text(path, key, value):
    """``value`` of the text field ``key`` of student.json ``path``, unchanged; ValueError (one line) if it
    is not a string, is empty or blank, or holds a character of ``NOT_IN_TEXT`` or of ``LINE_BREAKING``."""
    if not isinstance(value, str):
        raise ValueError(f"{path}: {key} must be text in double quotes, got {value!r}")
    if not value.strip():
        raise ValueError(f"{path}: {key} is empty ({value!r}); write your {key.replace('_', ' ')} there")
    for char in value:
        if char in NOT_IN_TEXT or unicodedata.category(char) in LINE_BREAKING:
            reason = NOT_IN_TEXT.get(char, "a line break or control character")
            raise ValueError(
                f"{path}: {key} {value!r} holds {char!r} ({reason}); allowed: any text without "
                f"{', '.join(map(repr, NOT_IN_TEXT))}, line breaks or other control characters"
            )
    return value


def check_student_id(value):
    """``value`` as a student ID: an int, or a string of the digits 0-9 (surrounding spaces allowed), in
    [0, 2**32), the range of np.random.seed, which Part 1 seeds with it. Returns the int; ValueError (one
    line, naming the value) otherwise."""
    number = int(value) if isinstance(value, str) and re.fullmatch(r"\s*[0-9]+\s*", value) else value
    if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < 2**32:
        raise ValueError(
            "the student ID must be a whole number in [0, 2**32) (what np.random.seed accepts), "
            f"e.g. 12345678, got {value!r}"
        )
    return number


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


def plot_histories(
    histories,
    title,
    metrics=("accuracy", "loss"),
    best_epochs=None,
    colors=None,
    train=True,
    width=6.5,
    height=4,
):
    """Training curves of one or more runs, side by side per metric: train solid, validation dashed.

    ``histories``: {label: Keras-style history dict with ``metric`` and ``val_<metric>`` lists};
    ``best_epochs``: {label: 1-based epoch whose weights were kept}, marked with a dotted line;
    ``colors``: {label: matplotlib colour} (one colour per technique across a notebook; default: the
    style's cycle); ``train=False`` draws the validation curves alone; ``width`` (of each panel) and
    ``height``: in inches.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(metrics), figsize=(width * len(metrics), height), squeeze=False)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {label: (colors or {}).get(label, cycle[i % len(cycle)]) for i, label in enumerate(histories)}
    for label, history in histories.items():
        color = colors[label]
        epochs = range(1, len(history["loss"]) + 1)
        for ax, metric in zip(axes[0], metrics):
            if train:
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


def source(obj):
    """The source of a function or class as the notebooks show it: ``inspect.getsource`` without the
    docstring (which stays in the module), dedented. The code itself, comments included, is unchanged."""
    import ast
    import inspect
    import textwrap

    text = textwrap.dedent(inspect.getsource(obj))
    node = ast.parse(text).body[0]
    if ast.get_docstring(node, clean=False) is not None:
        lines = text.splitlines(keepends=True)
        del lines[node.body[0].lineno - 1 : node.body[0].end_lineno]
        text = "".join(lines)
    return text


def answer_slot():
    """Reserve the place of a question's bold answer line right under its heading, for an answer computed
    further down: shows a pending note until the returned display handle's ``update(Markdown(...))``
    replaces it (papermill writes the update into this cell's saved output, so the exported report shows
    the answer first and its evidence after it)."""
    from IPython.display import Markdown, display

    return display(Markdown("*(answer pending: computed further down)*"), display_id=True)


def training_record(label, history, epochs_run, kept_epoch, seconds, computed_at, epochs=None):
    """One trained model's record as ``training_table`` shows it: ``history`` is Keras's per-epoch dict
    (its last ``accuracy`` and ``val_accuracy`` are shown), ``epochs_run`` and ``kept_epoch`` (1-based;
    None: the last) count epochs, ``epochs`` the epochs asked for (None: not shown), ``seconds`` the
    training time recorded when it was trained and ``computed_at`` when (ISO 8601; None: unknown)."""
    if not history.get("accuracy") or not history.get("val_accuracy"):
        raise ValueError(f"{label}: the history has no per-epoch accuracy and val_accuracy")
    return dict(
        model=label,
        epochs_run=int(epochs_run),
        epochs=None if epochs is None else int(epochs),
        kept_epoch=int(kept_epoch or epochs_run),
        minutes=float(seconds) / 60,
        train_acc=float(history["accuracy"][-1]),
        val_acc=float(history["val_accuracy"][-1]),
        trained=(computed_at or "unknown")[:10],
    )


def _epochs(record):
    return f"{record['epochs_run']}" + ("" if record["epochs"] is None else f" of {record['epochs']}")


def training_line(record):
    """Markdown: one ``training_record`` as a line, e.g. "*Trained:* mixup, 40 of 40 epochs, kept epoch 39,
    12.3 min; last epoch: training accuracy 0.702, validation 0.776; on 2026-11-29."."""
    r = record
    return (
        f"*Trained:* {r['model']}, {_epochs(r)} epochs, kept epoch {r['kept_epoch']}, "
        f"{r['minutes']:.1f} min; last epoch: training accuracy {r['train_acc']:.3f}, "
        f"validation {r['val_acc']:.3f}; on {r['trained']}."
    )


def training_table(records, title="trained"):
    """Markdown: a small table of ``training_record``s, one row a model, saying that (and when) each was
    trained: epochs run (of those asked for), the kept epoch, minutes, the last epoch's training and
    validation accuracy, and the date it was trained."""
    rows = [
        f"| {r['model']} | {_epochs(r)} | {r['kept_epoch']} | {r['minutes']:.1f} "
        f"| {r['train_acc']:.3f} / {r['val_acc']:.3f} | {r['trained']} |"
        for r in records
    ]
    head = f"| {title} | epochs | kept | min | last epoch: train / valid | on |\n|---|---|---|---|---|---|\n"
    return head + "\n".join(rows) + "\n"


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


# --------------------------------------------------------------------------------------------------
# Comparisons in words
# --------------------------------------------------------------------------------------------------
# The words a comparative sentence may use, and where they come from: ``compare`` (a direction and its
# significance) or ``rank`` (the extreme of a table the reader sees). tests/test_claims.py finds every
# sentence of the committed notebooks that uses one and requires it to carry a recorded comparison.
COMPARATIVE_WORDS = (
    "gain",
    "gains",
    "helps",
    "hurts",
    "pays",
    "better",
    "worse",
    "larger",
    "largest",
    "smaller",
    "smallest",
    "stronger",
    "strongest",
    "weaker",
    "weakest",
    "significant",
    "significantly",
    "improves",
    "a loss of",
)


def compare(
    label_a, label_b, metric, correct_a=None, correct_b=None, values_a=None, values_b=None, alpha=0.05
):
    """B against A in words, by construction: direction, size and significance of ``B - A``.

    Either ``correct_a``/``correct_b``, (N,) bools (is each model right on each of the same N images:
    McNemar's exact test), or ``values_a``/``values_b``, one figure per seed (Welch's t-test on the
    seed means; with one seed each there is no test and no direction is claimed). ``metric`` names
    what the figures are (e.g. "validation accuracy"). The direction is "gain" or "loss" only when the
    test rejects equality at ``alpha``; otherwise "no measurable change". Returns a dict (JSON-ready,
    stored in ``results/partN.json``) with ``a``, ``b`` (the two figures: accuracies, or seed means),
    ``difference``, ``test``, ``p_value``, ``detail`` (the discordant images, or the seeds),
    ``significant``, ``direction`` and ``words``.

    The words say each thing once, the test in a short parenthesis: "a gain, 0.132 → 0.207 (+0.075,
    significant: McNemar p = 3.3e-14)", "no measurable change, 0.620 → 0.638 (+0.018, McNemar p = 0.24)".
    They leave the metric (and a scope such as "2 seeds pooled") to the sentence around them, which names
    it once ("under PGD-20, a gain, ..."; "on validation, no measurable change, ..."); the record keeps it.
    """
    paired = correct_a is not None and correct_b is not None and values_a is None and values_b is None
    seeds = values_a is not None and values_b is not None and correct_a is None and correct_b is None
    if not (paired or seeds):
        raise ValueError("give correct_a and correct_b (same images), or values_a and values_b (seeds)")
    if paired:
        test = mcnemar(correct_b, correct_a, alpha)
        a, b = float(np.mean(correct_a)), float(np.mean(correct_b))
        test_name, p_value = "McNemar", test.p_value
        detail = f"{test.a_only} vs {test.b_only} discordant images"  # B right only vs A right only
    else:
        from scipy.stats import ttest_ind

        va, vb = np.asarray(values_a, dtype=float), np.asarray(values_b, dtype=float)
        a, b = float(va.mean()), float(vb.mean())
        if min(len(va), len(vb)) < 2:
            test_name, p_value, detail = "one seed", 1.0, "no test with one seed"
        else:
            test_name = "Welch t"
            p_value = float(ttest_ind(vb, va, equal_var=False).pvalue)
            if not np.isfinite(p_value):  # both spreads zero: equal means or a certain difference
                p_value = 1.0 if a == b else 0.0
            detail = f"{len(vb)} vs {len(va)} seeds"
    return _comparison(label_a, label_b, metric, a, b, test_name, p_value, detail, alpha)


def _comparison(label_a, label_b, metric, a, b, test_name, p_value, detail, alpha):
    significant = bool(p_value < alpha) and a != b
    direction = ("gain" if b > a else "loss") if significant else "no measurable change"
    if test_name == "one seed":
        test = detail  # "no test with one seed"
    else:
        shown = f"{p_value:.2g}"
        if significant and float(shown) >= alpha:  # 0.0496 would read "p = 0.05" next to "significant"
            shown = f"{p_value:.3g}"
        test = f"{'significant: ' if significant else ''}{test_name} p = {shown}"
    verdict = f"a {direction}" if significant else direction
    # The figures as shown add up: three decimals where they do, else four ("0.888 → 0.889 (+0.000)" for
    # 0.8885 → 0.8886 reads "0.8885 → 0.8886 (+0.0001)"), the difference then that of the figures shown.
    digits = 3 if f"{round(b, 3) - round(a, 3):+.3f}" == f"{b - a:+.3f}" else 4
    difference_shown = round(b, digits) - round(a, digits)
    words = f"{verdict}, {a:.{digits}f} → {b:.{digits}f} ({difference_shown:+.{digits}f}, {test})"
    return dict(
        kind="comparison",
        a_label=label_a,
        b_label=label_b,
        metric=metric,
        a=a,
        b=b,
        difference=b - a,
        test=test_name,
        p_value=float(p_value),
        detail=detail,
        alpha=alpha,
        significant=significant,
        direction=direction,
        words=words,
    )


def rerender(record):
    """The words ``compare`` or ``rank`` gives for a stored record's figures (the claims test checks
    that the stored words are these)."""
    if record["kind"] == "ranking":
        return rank(record["values"], record["metric"], record["extreme"], record["fmt"])["words"]
    return _comparison(
        record["a_label"],
        record["b_label"],
        record["metric"],
        record["a"],
        record["b"],
        record["test"],
        record["p_value"],
        record["detail"],
        record["alpha"],
    )["words"]


def rank(values, metric, extreme="largest", fmt="+.3f"):
    """The extreme of a table the reader sees, in words: ``values`` {label: figure}; ``extreme``
    "largest" or "smallest"; ``fmt``: how a figure is printed. Returns a JSON-ready dict with
    ``winner`` and ``words``, e.g. "the largest validation accuracy gain: 40 epochs (+0.044, of 5
    rows)"."""
    if extreme not in ("largest", "smallest") or not values:
        raise ValueError(f"extreme must be 'largest' or 'smallest' over a non-empty table, got {extreme!r}")
    pick = max if extreme == "largest" else min
    winner = pick(values, key=values.get)
    words = f"the {extreme} {metric}: {winner} ({values[winner]:{fmt}}, of {len(values)} rows)"
    return dict(
        kind="ranking",
        metric=metric,
        extreme=extreme,
        fmt=fmt,
        values=dict(values),
        winner=winner,
        words=words,
    )
