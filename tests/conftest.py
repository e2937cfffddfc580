"""Shared test fixtures: the repository root, the Animals data location, and one quick-profile run of each
notebook per test session (in a committed copy of the working tree), shared by the tests that need one.

`make test` runs pytest on two workers (pytest-xdist, `--dist loadgroup`); `pytest_xdist_make_scheduler`
keeps each test module on one worker, so that its module-scoped fixtures are built once, and hands out the
longest modules first, so that the two workers finish together."""

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test`'s two workers on two cores: one compute thread each (TensorFlow's intra-op pool and oneDNN's
    # OpenMP), inherited by the notebooks they execute, rather than two each that compete for the same cores
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def animals_dir():
    """The Animals folder the notebooks use ($ANIMALS_DIR, else datasets/Animals), or None without images."""
    path = Path(os.environ.get("ANIMALS_DIR") or REPO_ROOT / "datasets" / "Animals")
    has_images = path.is_dir() and any(f.is_file() for d in path.iterdir() if d.is_dir() for f in d.iterdir())
    return path if has_images else None


# The groups that take longest in `make test`, about longest first (their tests' times added up, measured on
# each worker); the other groups follow, most tests first (pytest-xdist's own order)
LONGEST_GROUPS = (
    "test_part3",
    "test_part2",
    "test_experiments",
    "test_attacks_regularizers",
    "test_submission",
    "test_foundation",
    "test_models_core",
    "test_student",
    "test_part1",
    "test_evaluations",
    "test_apgd",
)


def xdist_group(nodeid):
    """The group of the test ``nodeid`` under `--dist loadgroup`: its module's name, except that the
    quick-profile test of Part N in test_foundation.py joins test_partN.py's group, whose tests use the same
    run: each notebook is executed once per session, by one worker."""
    path, _, test = nodeid.partition("::")
    quick = "test_quick_profile_leaves_the_checkout_clean["
    if Path(path).stem == "test_foundation" and test.startswith(quick):
        return notebook_group(test[len(quick) : -1])
    return Path(path).stem


def notebook_group(notebook):
    """The group of the tests of Part N's notebook: Assignment01_Part2_solution.ipynb -> test_part2."""
    return "test_" + notebook.split("_")[1].lower()


def pytest_collection_modifyitems(items):
    """Stops the session where ``xdist_group``, which sees only test ids, would not put a test that takes a
    notebook's quick-profile run (``notebook`` parameter, ``quick_profile_run`` fixture) in that notebook's
    group (a test renamed or added)."""
    for item in items:
        notebook = item.callspec.params.get("notebook") if hasattr(item, "callspec") else None
        if notebook and "quick_profile_run" in item.fixturenames:
            if xdist_group(item.nodeid) != notebook_group(notebook):
                raise pytest.UsageError(
                    f"{item.nodeid}: conftest.xdist_group must return {notebook_group(notebook)}"
                )


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # before pytest-xdist's own; optional without pytest-xdist
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup` with the groups of ``xdist_group``, LONGEST_GROUPS first. pytest-xdist 3.8 would
    read the groups from `xdist_group` marks, through a suffix it appends to the test ids, which pytest 9.2
    ignores (pytest-xdist issue #1386): every test would be a group of its own, a module's fixtures built on
    both workers and a notebook's quick-profile run waited for by the other worker."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return xdist_group(nodeid)

        def _assign_work_unit(self, node):
            for group in reversed(LONGEST_GROUPS):
                if group in self.workqueue:
                    self.workqueue.move_to_end(group, last=False)
            super()._assign_work_unit(node)

    return GroupScheduling(config, log)


def small_net(cls=None, **kwargs):
    """The unit tests' small network: 16x16 images, 3 classes, one block of 4 feature maps with batch norm and
    dropout 0.2, batch 16, one epoch at learning rate 1e-3, silent; ``kwargs`` override any of these and add
    options. ``cls``: YourModel by default; DefaultModel, whose blocks are fixed, gets its 2 blocks of 32 maps
    without batch norm."""
    import models

    cls = cls or models.YourModel
    defaults = dict(
        width=16,
        height=16,
        num_blocks=1,
        feature_maps=4,
        num_classes=3,
        batch_norm=True,
        drop_rate=0.2,
        batch_size=16,
        num_epochs=1,
        learning_rate=1e-3,
        verbose=False,
    )
    if cls is models.DefaultModel:
        defaults.update(feature_maps=32, num_blocks=2, batch_norm=None)
    return cls(**{**defaults, **kwargs})


def attacked_net(**kwargs):
    """``small_net`` as the attack tests train it (test_attacks_regularizers.py, test_apgd.py): two blocks of
    8 maps without dropout, batch 32, two epochs; ``kwargs`` override any of these."""
    return small_net(
        **{**dict(num_blocks=2, feature_maps=8, drop_rate=0.0, batch_size=32, num_epochs=2), **kwargs}
    )


@pytest.fixture
def repo_root():
    return REPO_ROOT


@pytest.fixture
def animals():
    """The Animals folder; skips the test when the images are absent."""
    path = animals_dir()
    if path is None:
        pytest.skip(
            "Animals data absent: put it in datasets/Animals or set ANIMALS_DIR (see datasets/README.md)"
        )
    return path


def run(cmd, cwd=REPO_ROOT, env=None, timeout=300):
    """Run a command; CompletedProcess with text stdout/stderr."""
    return subprocess.run(
        cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def git(*args, cwd):
    return run(["git", "-c", "user.name=test", "-c", "user.email=test@example.org", *args], cwd=cwd)


def checkout_copy(dest):
    """A committed copy of the working tree (tracked and untracked files, minus ignored ones), so that a
    run in it can be checked with `git status` whatever else happens in the real checkout meanwhile."""
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO_ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    if animals_dir() is not None:
        (dest / "datasets" / "Animals").symlink_to(animals_dir().resolve())
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "snapshot"]):
        assert git(*args, cwd=dest).returncode == 0


@pytest.fixture(scope="session")
def quick_profile_run(tmp_path_factory):
    """``quick_profile_run(notebook)``: the notebook executed once per test session in the quick profile, as
    `make quick` runs it (default output folder runs/quick/), in a committed copy of the working tree.
    Returns (checkout folder, papermill's CompletedProcess); the executed notebook and its results are
    under ``checkout / "runs" / "quick"``. Under pytest-xdist the workers share one run per notebook: the
    first to ask executes it in the session's common temporary folder, holding a lock, and the others wait
    for it and read its result (with `--dist loadgroup` the tests of a run are in one group, see
    ``xdist_group``, so that one worker asks)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the folder all the workers' base folders are in
    done = {}

    def execute(notebook):
        if notebook not in done:
            folder = shared / f"quick_{Path(notebook).stem}"
            folder.mkdir(exist_ok=True)
            with open(folder / "lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
                result = folder / "result.json"
                checkout = folder / "checkout"
                if not result.exists():
                    checkout_copy_fresh(checkout)
                    (checkout / "runs" / "quick").mkdir(parents=True)
                    command = [sys.executable, "-m", "papermill", notebook, f"runs/quick/{notebook}"]
                    command += ["-p", "PROFILE", "quick", "-k", "python3", "--cwd", str(checkout)]
                    proc = run(command, cwd=checkout, timeout=1200)
                    result.write_text(json.dumps([proc.args, proc.returncode, proc.stdout, proc.stderr]))
                args, returncode, stdout, stderr = json.loads(result.read_text())
            done[notebook] = (checkout, subprocess.CompletedProcess(args, returncode, stdout, stderr))
        return done[notebook]

    return execute


def checkout_copy_fresh(dest):
    """``checkout_copy`` into ``dest``, removing what an interrupted earlier attempt left there."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    checkout_copy(dest)
