"""experiments.py: the semantic cache key, the ExperimentCache and the `check` command.

The key tests work on copies of the library modules in a temporary folder, edited as a refactoring
would edit them (comments, docstrings, a function moved to another module) or as a real change would
(the PGD projection's clip bound, a default), and compare the code fingerprints computed by a fresh
interpreter in that folder. The `check` tests run the command on such a copy with the committed cache
entries and the real Animals data.
"""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO_ROOT, animals_dir
from experiments import ExperimentCache, Run
from models import DefaultModel
from test_models_core import small_net, tiny_manager

LIBRARY = ["models.py", "attacks.py", "training.py", "storage.py", "report.py", "experiments.py"]
TOP_LEVEL = re.compile(r"^(def |class |@|[A-Z_][A-Z0-9_]*(, [A-Z_][A-Z0-9_]*)* = )", re.M)


def library_copy(folder, edit=None):
    """The library modules copied into ``folder``; ``edit(name, text) -> text`` changes them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in LIBRARY:
        text = (REPO_ROOT / name).read_text()
        (folder / name).write_text(edit(name, text) if edit else text)
    return folder


def fingerprints(folder):
    """{class name: code fingerprint} of DefaultModel and YourModel, computed by a new interpreter
    that imports the library from ``folder``."""
    script = (
        "import experiments, models\n"
        "print(*(experiments.code_fingerprint(c) for c in (models.DefaultModel, models.YourModel)))"
    )
    env = {**os.environ, "PYTHONPATH": str(folder), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=folder, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(zip(["DefaultModel", "YourModel"], proc.stdout.split()))


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return fingerprints(library_copy(tmp_path_factory.mktemp("original")))


def comment_every_definition(name, text):
    return TOP_LEVEL.sub(lambda m: f"# a comment added by a refactoring\n{m.group(0)}", text)


def move_sample_beta_to_attacks(name, text):
    """Moves training.sample_beta into attacks.py (and imports it back): a move between modules."""
    source = (REPO_ROOT / "training.py").read_text()
    function = re.search(r"^def sample_beta\(.*?(?=^\S)", source, re.M | re.S).group(0)
    if name == "training.py":
        text = text.replace(function, "").replace(
            "from attacks import ", "from attacks import sample_beta\nfrom attacks import "
        )
    elif name == "attacks.py":
        text = text + "\n\n" + function
    return text


def reword_docstrings_and_layout(name, text):
    text = text.replace('"""Projection onto the L-infinity ball', '"""Clips to the L-infinity ball')
    text = text.replace(
        "    return tf.clip_by_value(tf.clip_by_value(x_adv, x - eps, x + eps), CLIP_MIN, CLIP_MAX)",
        "    return tf.clip_by_value(\n        tf.clip_by_value(x_adv, x - eps, x + eps),  # the ball\n"
        "        CLIP_MIN,\n        CLIP_MAX,\n    )",
    )
    return text


@pytest.mark.slow
@pytest.mark.parametrize(
    "edit",
    [comment_every_definition, move_sample_beta_to_attacks, reword_docstrings_and_layout],
    ids=["comments", "moved-function", "docstring-and-layout"],
)
def test_refactoring_keeps_the_code_fingerprint(edit, original, tmp_path):
    folder = library_copy(tmp_path, edit)
    changed = sum((folder / n).read_text() != (REPO_ROOT / n).read_text() for n in LIBRARY)
    assert changed >= 1, "the edit must change at least one module"
    assert fingerprints(folder) == original


@pytest.mark.slow
@pytest.mark.parametrize(
    "module, old, new, changes",
    [
        ("attacks.py", "CLIP_MIN, CLIP_MAX = -1.0, 1.0", "CLIP_MIN, CLIP_MAX = -1.0, 0.99", ["YourModel"]),
        (
            "training.py",
            "lam = tf.cast(lam, x.dtype)",
            "lam = tf.cast(lam, x.dtype)",
            [],
        ),  # the test's control
        ("models.py", "momentum=0.9", "momentum=0.99", ["YourModel"]),
        ("models.py", "SEED = 1234", "SEED = 4321", ["DefaultModel", "YourModel"]),
        (
            "training.py",
            "a = tf.random.gamma([], alpha)",
            "a = tf.random.gamma([], alpha + 0.0)",
            ["YourModel"],
        ),
        (
            "models.py",
            '"adam": keras.optimizers.Adam,',
            '"adam": keras.optimizers.AdamW,',
            ["DefaultModel", "YourModel"],
        ),
    ],
    ids=["clip-bound", "no-op", "bn-momentum", "seed", "beta-sampler", "optimizer-table"],
)
def test_a_change_training_uses_changes_the_fingerprint(module, old, new, changes, original, tmp_path):
    assert old in (REPO_ROOT / module).read_text()
    folder = library_copy(tmp_path, lambda name, text: text.replace(old, new) if name == module else text)
    after = fingerprints(folder)
    assert sorted(c for c in original if after[c] != original[c]) == changes


# ------------------------------------------------------------------------------------------------
# The cache on tiny data
# ------------------------------------------------------------------------------------------------
def tiny_data(seed=0):
    return tiny_manager(seed=seed)


def tiny_net(**kwargs):
    return small_net(**{"num_epochs": 2, **kwargs})


def test_second_fit_reuses_the_entry(tmp_path, capsys):
    cache = ExperimentCache(tmp_path, tiny_data())
    first = cache.fit(tiny_net(), "tiny")
    assert isinstance(first, Run) and not first.reused and first.epochs_run == 2
    assert first.model_path == tmp_path / "models" / "tiny.h5" and first.model_path.is_file()
    assert (tmp_path / "results" / "cache" / "tiny.json").is_file()
    capsys.readouterr()
    network = tiny_net()
    second = cache.fit(network, "tiny")
    assert second.reused and second.history == first.history and second.seconds == first.seconds
    assert "Reused tiny: 2 epochs" in capsys.readouterr().out
    assert network.model is not None and network.history == first.history
    assert list(cache.entries()) == ["tiny"]
    assert oct((tmp_path / "results" / "cache" / "tiny.json").stat().st_mode & 0o777) == "0o644"
    assert oct(first.model_path.stat().st_mode & 0o777) == "0o644"


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(network=dict(learning_rate=1e-2)), "config"),
        (dict(fit=dict(num_epochs=1)), "config"),
        (dict(data_seed=1), "data"),
    ],
    ids=["learning-rate", "fit-epochs", "data"],
)
def test_a_changed_key_part_retrains_and_says_why(change, reason, tmp_path, capsys):
    ExperimentCache(tmp_path, tiny_data()).fit(tiny_net(), "tiny")
    capsys.readouterr()
    cache = ExperimentCache(tmp_path, tiny_data(seed=change.get("data_seed", 0)))
    run = cache.fit(tiny_net(**change.get("network", {})), "tiny", **change.get("fit", {}))
    assert not run.reused
    assert f"Retraining tiny: its {reason} changed." in capsys.readouterr().out
    assert cache.fit(tiny_net(**change.get("network", {})), "tiny", **change.get("fit", {})).reused


def test_force_retrains_a_current_entry(tmp_path):
    ExperimentCache(tmp_path, tiny_data()).fit(tiny_net(), "tiny")
    assert not ExperimentCache(tmp_path, tiny_data(), force=True).fit(tiny_net(), "tiny").reused


def test_check_reports_current_and_stale_entries(tmp_path):
    data = tiny_data()
    cache = ExperimentCache(tmp_path, data)
    cache.fit(tiny_net(), "a")
    cache.fit(
        DefaultModel(width=16, height=16, num_classes=3, batch_size=16, num_epochs=1, verbose=False), "grid/b"
    )
    assert cache.check() == [("a", []), ("grid/b", [])]
    assert ExperimentCache(tmp_path, tiny_data(seed=1)).check() == [("a", ["data"]), ("grid/b", ["data"])]
    (tmp_path / "models" / "a.h5").unlink()
    assert cache.check()[0] == ("a", ["model file missing"])


KILLED_RUN = textwrap.dedent(
    """
    import sys
    import keras
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    from test_experiments import tiny_data, tiny_net
    from experiments import ExperimentCache

    class Pause(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if {pause} and self.epoch == 1 and batch == 1:
                print("MID-EPOCH", flush=True)   # epoch 2, batch 2 of 3: the parent kills us here
                import time; time.sleep(120)

    run = ExperimentCache({folder!r}, tiny_data()).fit(tiny_net(num_epochs=3), "killed", callbacks=[Pause()])
    print("REUSED" if run.reused else "TRAINED", flush=True)
    """
)


def run_killable(folder, pause):
    script = KILLED_RUN.format(
        root=str(REPO_ROOT), tests=str(REPO_ROOT / "tests"), folder=str(folder), pause=pause
    )
    return subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )


@pytest.mark.slow
def test_a_run_killed_mid_epoch_leaves_nothing_and_reruns(tmp_path):
    proc = run_killable(tmp_path, pause=True)
    deadline = time.time() + 120
    line = proc.stdout.readline()
    while line and line.strip() != "MID-EPOCH" and time.time() < deadline:
        line = proc.stdout.readline()
    assert line.strip() == "MID-EPOCH"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    left = [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()]
    assert left == [], f"a killed run left {left}"
    rerun = run_killable(tmp_path, pause=False)
    assert rerun.communicate(timeout=300)[0].split()[-1] == "TRAINED"
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        os.path.join("models", "killed.h5"),
        os.path.join("results", "cache", "killed.json"),
    ]
    again = run_killable(tmp_path, pause=False)
    assert again.communicate(timeout=300)[0].split()[-1] == "REUSED"


# ------------------------------------------------------------------------------------------------
# The command on the committed entries
# ------------------------------------------------------------------------------------------------
def check_command(folder, library=REPO_ROOT):
    env = {
        **os.environ,
        "PYTHONPATH": str(library),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "ANIMALS_DIR": str(animals_dir()),
    }
    return subprocess.run(
        [sys.executable, "-m", "experiments", "check", "--folder", str(folder)],
        cwd=library,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


needs_animals = pytest.mark.skipif(animals_dir() is None, reason="Animals data absent")


@pytest.mark.slow
@needs_animals
@pytest.mark.parametrize(
    "edit, expected",
    [
        (None, "all current"),
        (comment_every_definition, "all current"),
        (
            lambda name, text: (
                text.replace("CLIP_MIN, CLIP_MAX = -1.0, 1.0", "CLIP_MIN, CLIP_MAX = -1.0, 0.99")
                if name == "attacks.py"
                else text
            ),
            "stale",
        ),
    ],
    ids=["as-committed", "comments", "clip-bound"],
)
def test_check_command_on_the_committed_entries(edit, expected, tmp_path):
    library = library_copy(tmp_path / "library", edit)
    proc = check_command(REPO_ROOT, library)
    lines = proc.stdout.strip().splitlines()
    count = len(list((REPO_ROOT / "results" / "cache").rglob("*.json")))
    if expected == "all current":
        assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
        assert lines[-1] == f"{count} entries, all current"
    else:
        assert proc.returncode == 1
        stale = [line for line in lines[:-1] if line.endswith("stale (code changed)")]
        # every YourModel entry depends on the projection (adversarial validation); DefaultModel's do not
        assert len(stale) == count - 2 and lines[-1] == f"{count} entries, {count - 2} stale"
