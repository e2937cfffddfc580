"""experiments.py: the semantic cache key, the ExperimentCache and the `check` command.

The key tests work on copies of the library modules in a temporary folder, edited as a refactoring
would edit them (comments, docstrings, a function moved to another module) or as a real change would
(the PGD projection's clip bound, a default), and compare the code fingerprints computed by a fresh
interpreter in that folder. The `check` tests run the command on such a copy with the committed cache
entries and the real Animals data.
"""

import dataclasses
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import experiments
import models
from conftest import REPO_ROOT, animals_dir, small_net
from experiments import ExperimentCache, Run
from models import DefaultModel
from test_models_core import tiny_manager

LIBRARY = ["models.py", "attacks.py", "training.py", "storage.py", "report.py", "experiments.py", "dnn.py"]
TOP_LEVEL = re.compile(r"^(def |class |@|[A-Z_][A-Z0-9_]*(, [A-Z_][A-Z0-9_]*)* = )", re.M)


def library_copy(folder, edit=None):
    """The library modules copied into ``folder``; ``edit(name, text) -> text`` changes them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in LIBRARY:
        text = (REPO_ROOT / name).read_text()
        (folder / name).write_text(edit(name, text) if edit else text)
    return folder


FINGERPRINTS = """
import json, sys
found = {}
for name, folder in json.loads(sys.argv[1]).items():
    for module in ("models", "attacks", "training", "storage", "report", "experiments"):
        sys.modules.pop(module, None)
    sys.path.insert(0, folder)
    import experiments, models
    found[name] = {c: experiments.code_fingerprint(getattr(models, c)) for c in ("DefaultModel", "YourModel")}
    sys.path.remove(folder)
print(json.dumps(found))
"""


def fingerprints(folders):
    """{variant: {class name: code fingerprint}} of DefaultModel and YourModel for each library copy in
    ``folders`` ({variant: folder}), each imported afresh by one new interpreter (TensorFlow once)."""
    arg = json.dumps({name: str(folder) for name, folder in folders.items()})
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-c", FINGERPRINTS, arg],
        cwd=REPO_ROOT / "tests",
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


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


def replace_in(module, old, new):
    def edit(name, text):
        if name == module:
            assert old in text, (module, old)
            return text.replace(old, new)
        return text

    return edit


REFACTORINGS = {
    "comments": comment_every_definition,
    "moved-function": move_sample_beta_to_attacks,
    "docstring-and-layout": reword_docstrings_and_layout,
    "no-op": replace_in("training.py", "lam = tf.cast(lam, x.dtype)", "lam = tf.cast(lam, x.dtype)"),
}
CHANGES = {  # a change that training uses, and the classes whose code it changes
    "clip-bound": (
        replace_in("attacks.py", "CLIP_MIN, CLIP_MAX = -1.0, 1.0", "CLIP_MIN, CLIP_MAX = -1.0, 0.99"),
        ["YourModel"],
    ),
    "bn-momentum": (replace_in("models.py", "momentum=0.9", "momentum=0.99"), ["YourModel"]),
    "seed": (replace_in("models.py", "SEED = 1234", "SEED = 4321"), ["DefaultModel", "YourModel"]),
    "beta-sampler": (
        replace_in("training.py", "a = tf.random.gamma([], alpha)", "a = tf.random.gamma([], alpha + 0.0)"),
        ["YourModel"],
    ),
    "optimizer-table": (
        replace_in("models.py", '"adam": keras.optimizers.Adam,', '"adam": keras.optimizers.AdamW,'),
        ["DefaultModel", "YourModel"],
    ),
}


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """The fingerprints of the library as it is, after each refactoring and after each change."""
    root = tmp_path_factory.mktemp("variants")
    edits = {"original": None, **REFACTORINGS, **{name: edit for name, (edit, _) in CHANGES.items()}}
    folders = {name: library_copy(root / name, edit) for name, edit in edits.items()}
    for name in edits:
        changed = [n for n in LIBRARY if (folders[name] / n).read_text() != (REPO_ROOT / n).read_text()]
        assert bool(changed) == (name not in ("original", "no-op")), name
    return fingerprints(folders)


@pytest.mark.slow
@pytest.mark.parametrize("refactoring", sorted(REFACTORINGS))
def test_refactoring_keeps_the_code_fingerprint(refactoring, variants):
    assert variants[refactoring] == variants["original"]


@pytest.mark.slow
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_change_training_uses_changes_the_fingerprint(change, variants):
    changed = sorted(c for c in variants["original"] if variants[change][c] != variants["original"][c])
    assert changed == CHANGES[change][1]


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
    assert cache.entry("tiny") == cache.entries()["tiny"] and cache.entry("tiny").history == first.history
    with pytest.raises(KeyError, match="no cache entry 'other'"):
        cache.entry("other")
    assert oct((tmp_path / "results" / "cache" / "tiny.json").stat().st_mode & 0o777) == "0o644"
    assert oct(first.model_path.stat().st_mode & 0o777) == "0o644"
    quiet = ExperimentCache(tmp_path, tiny_data(), quiet=True)
    quiet.fit(tiny_net(), "tiny")
    assert capsys.readouterr().out == "" and quiet.reused == ["tiny"] and quiet.trained == []
    assert cache.trained == ["tiny"] and cache.reused == ["tiny"]


@pytest.mark.slow
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


def test_the_entry_keeps_the_training_log_and_still_prints_it(tmp_path, capsys):
    cache = ExperimentCache(tmp_path, tiny_data())
    trained = cache.fit(tiny_net(verbose=2), "tiny")
    printed = capsys.readouterr().out
    assert "Epoch 2/2" in trained.log and trained.log.strip() in printed
    assert cache.fit(tiny_net(verbose=2), "tiny").log == trained.log == cache.entries()["tiny"].log


def test_force_retrains_a_current_entry(tmp_path):
    ExperimentCache(tmp_path, tiny_data()).fit(tiny_net(), "tiny")
    assert not ExperimentCache(tmp_path, tiny_data(), force=True).fit(tiny_net(), "tiny").reused


def test_a_current_entry_without_its_model_file_is_an_error_naming_it(tmp_path, capsys):
    ExperimentCache(tmp_path, tiny_data()).fit(tiny_net(), "grid/tiny")
    model = tmp_path / "models" / "grid" / "tiny.h5"
    model.unlink()
    capsys.readouterr()
    with pytest.raises(FileNotFoundError) as info:
        ExperimentCache(tmp_path, tiny_data()).fit(tiny_net(), "grid/tiny")
    message = str(info.value)
    assert str(model) in message and "force=True" in message and "\n" not in message
    assert not model.exists() and "Epoch" not in capsys.readouterr().out  # nothing trained
    assert not ExperimentCache(tmp_path, tiny_data(), force=True).fit(tiny_net(), "grid/tiny").reused
    assert model.is_file()


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
        (CHANGES["clip-bound"][0], "stale"),
    ],
    ids=["as-committed", "clip-bound"],
)
def test_check_command_on_the_committed_entries(edit, expected, tmp_path):
    library = library_copy(tmp_path / "library", edit)
    proc = check_command(REPO_ROOT, library)
    lines = proc.stdout.strip().splitlines()
    count = len(list((REPO_ROOT / "results" / "cache").rglob("*.json")))
    trainings = lines.index(next(line for line in lines if line.startswith(f"{count} entries")))
    if expected == "all current":
        assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
        assert lines[trainings] == f"{count} entries, all current"
        assert lines[-1].endswith("evaluations, all current")
    else:
        assert proc.returncode == 1
        stale = [line for line in lines[:trainings] if line.endswith("stale (code changed)")]
        # every YourModel entry depends on the projection (adversarial validation); DefaultModel's do not
        assert len(stale) == count - 2 and lines[trainings] == f"{count} entries, {count - 2} stale"


def switches(config):
    """What a recorded configuration (of either scheme: ``experiments.from_flat``) switches on: the course's
    augmentation, batch norm and skip connection and a keyword argument (the augmenter) where away from their
    defaults, each option that is on, and each field of it away from the field's default ("sam.fraction")."""
    config = experiments.from_flat(config)
    cls = getattr(models, config["class"])
    parameters = inspect.signature(cls.__init__).parameters
    options = getattr(cls, "OPTIONS", {})
    keywords = {k for k, p in parameters.items() if p.kind is p.KEYWORD_ONLY and k != "seed"} - set(options)
    used = {
        k
        for k in keywords | ({"is_augmentation", "batch_norm", "use_skip"} & set(parameters))
        if config.get(k, parameters[k].default) != parameters[k].default
    }
    for keyword, kind in options.items():
        if config.get(keyword) is not None:
            defaults = {field.name: field.default for field in dataclasses.fields(kind)}
            used |= {keyword} | {f"{keyword}.{k}" for k, v in config[keyword].items() if v != defaults.get(k)}
    return used


def test_restamp_probes_cover_every_option_the_committed_entries_use():
    """``tools/restamp_cache.py`` proves a library change harmless by training its probes with the old and
    the new code, so the probes must switch on every training option a committed entry switches on, and
    every field of it that an entry sets away from its default."""
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    import restamp_cache

    probed = {}
    for cls, options, _ in restamp_cache.PROBES.values():
        config = {"class": cls, **options}
        if "init_from" in config:  # a probe's weights, recorded by their sha256 when the probes run
            config["init_from_sha256"] = config.pop("init_from")
        probed.setdefault(cls, set()).update(switches(config))
    assert {"mixup", "sam.fraction", "early_stopping.start_from_epoch"} <= probed["YourModel"]
    for path in (REPO_ROOT / "results" / "cache").rglob("*.json"):
        config = json.loads(path.read_text())["key_parts"]["config"]
        used = switches(config)
        assert used <= probed[config["class"]], (path.name, used - probed[config["class"]])


# --------------------------------------------------------------------------------------------------
# The key across Python versions
# --------------------------------------------------------------------------------------------------
MODULE_TEXTS = """
import hashlib, json, sys
sys.path.insert(0, sys.argv[1])
import experiments
names = sys.argv[2:]
print(json.dumps({n: hashlib.sha256(experiments.module_text(n).encode()).hexdigest() for n in names}))
"""


def python_interpreters():
    """{"3.x": path} of every CPython 3.11+ found here: python3.11 ... python3.13 on the PATH that
    really run (a pyenv shim of a version that is not selected does not), then pyenv's versions."""
    import glob
    import shutil

    candidates = [shutil.which(f"python3.{minor}") for minor in (11, 12, 13)]
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(glob.glob(f"{root}/versions/3.1[1-9]*/bin/python3"))
    found = {}
    for path in filter(None, candidates):
        proc = subprocess.run(
            [path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True
        )
        version = proc.stdout.strip()
        if proc.returncode == 0 and version >= "3.11" and version not in found:
            found[version] = path
    return found


def test_the_key_text_of_the_code_is_the_same_under_every_python_found():
    interpreters = python_interpreters()
    if len(interpreters) < 2:
        pytest.skip(
            f"only one Python 3.11+ interpreter found ({', '.join(interpreters)}): nothing to compare"
        )
    texts = {}
    for version, path in interpreters.items():
        proc = subprocess.run(
            [path, "-c", MODULE_TEXTS, str(REPO_ROOT), *LIBRARY],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
        )
        assert proc.returncode == 0, f"Python {version} ({path}): {proc.stderr[-2000:]}"
        texts[version] = json.loads(proc.stdout)
    first = next(iter(texts))
    differ = {
        version: [name for name in LIBRARY if text[name] != texts[first][name]]
        for version, text in texts.items()
    }
    assert all(not names for names in differ.values()), f"differs from Python {first}: {differ}"


def test_the_canonical_text_leaves_out_what_only_a_python_version_spells():
    import ast

    from experiments import canonical_dump

    tree = ast.parse('def f(x: int, w=3):\n    return f"{x:>{w}} a" "b"\n')
    function = tree.body[0]
    with_empty = ast.parse('def f(x: int, w=3):\n    return f"{x:>{w}} a" "b"\n').body[0]
    with_empty.type_params = []  # what 3.12 adds
    spec = with_empty.body[0].value.values[0].format_spec
    spec.values.append(ast.Constant(""))  # what 3.12 adds to a nested format spec
    assert canonical_dump(function) == canonical_dump(with_empty)
    assert "type_params" not in canonical_dump(function) and "lineno" not in canonical_dump(function)
    changed = ast.parse('def f(x: int, w=4):\n    return f"{x:>{w}} a" "b"\n').body[0]
    assert canonical_dump(changed) != canonical_dump(function)
