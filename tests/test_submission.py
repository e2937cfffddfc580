"""The submission zip runs as submitted: built with `make submission` from a copy of the project, unzipped
into an empty folder with the Animals images linked beside it, its experiment cache is current, Part 1
executes in the full profile, and the setup sections of Parts 2 and 3 run there, Part 3 reusing its first
experiment instead of training it. A run missing its student file stops with one line naming it. (The whole
of Parts 2 and 3 takes far too long for a test; a missing Animals folder is test_models_core's.)"""

import json
import re
import shutil
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest

from conftest import REPO_ROOT, animals_dir, checkout_copy, run

pytestmark = pytest.mark.notebook


@pytest.fixture(scope="module")
def submission(tmp_path_factory):
    """(the zip, what `make submission EXAMPLE=1` printed), built in a copy of the committed project (whose
    student.json holds the template's placeholders)."""
    project = tmp_path_factory.mktemp("project")
    checkout_copy(project)
    (project / ".venv").symlink_to(Path(sys.prefix))
    out = tmp_path_factory.mktemp("zip")
    make = ["make", "-s", "--no-print-directory", "submission", "EXAMPLE=1", f"SUBMISSION_DIR={out}"]
    proc = run(make, cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (archive,) = out.glob("*_assignment01_solution.zip")
    return archive, proc.stdout


@pytest.fixture(scope="module")
def unzipped(submission, tmp_path_factory):
    """The zip extracted into an empty folder, with datasets/Animals linked when the images are here."""
    folder = tmp_path_factory.mktemp("unzipped")
    with zipfile.ZipFile(submission[0]) as zf:
        zf.extractall(folder)
    if animals_dir() is not None:
        (folder / "datasets").mkdir()
        (folder / "datasets" / "Animals").symlink_to(animals_dir().resolve())
    return folder


def execute(notebook, cwd, output, until=None, env=None, then=()):
    """papermill `notebook` in the full profile with `cwd` as the working folder; with `until`, only its
    cells up to and including the first code cell whose source contains `until`, then the code `then`."""
    source = nbformat.read(notebook, as_version=4)
    if until is not None:
        last = next(i for i, c in enumerate(source.cells) if c.cell_type == "code" and until in c.source)
        source.cells = [
            c for c in source.cells[: last + 1] if "injected-parameters" not in c.metadata.get("tags", [])
        ]
    source.cells += [nbformat.v4.new_code_cell(code) for code in then]
    prefix = output.with_name(f"{output.stem}_input.ipynb")
    nbformat.write(source, prefix)
    cmd = [sys.executable, "-m", "papermill", str(prefix), str(output), "-p", "PROFILE", "full"]
    proc = run([*cmd, "-k", "python3", "--cwd", str(cwd)], cwd=cwd, env=env, timeout=600)
    return proc, nbformat.read(output, as_version=4) if output.exists() else None


def text_of(notebook):
    """Everything the executed notebook printed or displayed, and its error values."""
    parts = []
    for cell in notebook.cells:
        for out in cell.get("outputs", []):
            parts += [out.get("text", ""), out.get("evalue", "")]
            parts += [value for value in out.get("data", {}).values() if isinstance(value, str)]
    return "\n".join(parts)


def test_the_zip_holds_what_the_notebooks_need_and_nothing_else(submission, unzipped):
    archive, printed = submission
    names = set(zipfile.ZipFile(archive).namelist())
    records = {str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "results" / "cache").rglob("*.json")}
    assert len(records) >= 21 and records <= names
    for record in records:
        name = record.removeprefix("results/cache/").removesuffix(".json")
        assert f"models/{name}.h5" in names
    parts = {f"results/part{n}.json" for n in (1, 2, 3)}
    modules = {
        f"{m}.py" for m in ("report", "storage", "attacks", "training", "models", "experiments", "dnn")
    }
    assert parts | modules | {"student.json", "requirements.txt", "README.md"} <= names
    assert not any(n.startswith((".venv", "runs/", "datasets/", "tests/", "tools/")) for n in names)
    assert "requirements.txt" in (unzipped / "README.md").read_text()
    assert "ANIMALS_DIR" in (unzipped / "README.md").read_text()
    size = re.search(r"(\d+) files, ([\d.]+) MB", printed)
    assert size and int(size.group(1)) == len(names)
    assert float(size.group(2)) == pytest.approx(archive.stat().st_size / 1e6, abs=0.05)


def test_every_cache_entry_is_current_in_the_unzipped_submission(unzipped, animals):
    proc = run([sys.executable, "-m", "experiments", "check"], cwd=unzipped, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    entries = len(list((unzipped / "results" / "cache").rglob("*.json")))
    assert f"{entries} entries, all current" in proc.stdout


def test_part1_executes_in_the_unzipped_submission(unzipped, tmp_path):
    proc, executed = execute(
        unzipped / "Assignment01_Part1_solution.ipynb", unzipped, tmp_path / "Part1.ipynb"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = json.loads((unzipped / "results" / "part1.json").read_text())  # rewritten by this run
    assert written == json.loads((REPO_ROOT / "results" / "part1.json").read_text())
    assert text_of(executed).count(": pass") >= 3  # the appendix checks against autodiff and Keras


def test_part2_setup_runs_in_the_unzipped_submission(unzipped, tmp_path):
    proc, executed = execute(
        unzipped / "Assignment01_Part2_solution.ipynb", unzipped, tmp_path / "Part2.ipynb", until="set_seed"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (block,) = [c for c in executed.cells if "student-info" in c.metadata.get("tags", [])]
    assert block.cell_type == "markdown" and "Student Information" in block.source


def test_part3_setup_reuses_the_first_experiment_in_the_unzipped_submission(unzipped, animals, tmp_path):
    """The setup and the default model: loaded from its cache entry, not trained, and as accurate on the
    test images as the committed results say."""
    committed = json.loads((unzipped / "results" / "part3.json").read_text())["default"]["test_acc"]
    proc, executed = execute(
        unzipped / "Assignment01_Part3_solution.ipynb",
        unzipped,
        tmp_path / "Part3_setup.ipynb",
        until='R["default"]',
        then=[
            f'assert R["default"]["test_acc"] == {committed!r}, R["default"]["test_acc"]',
            'assert cache.reused == ["Part3_default"] and cache.trained == [], (cache.reused, cache.trained)',
        ],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = text_of(executed)
    assert "Training" not in printed and "Epoch 1/" not in printed


def error_line(notebook):
    """The one error a failed notebook shows: (exception name, its value)."""
    (error,) = [out for c in notebook.cells for out in c.get("outputs", []) if out["output_type"] == "error"]
    return error["ename"], error["evalue"]


def test_a_missing_student_file_is_one_line_saying_what_to_do(unzipped, tmp_path):
    folder = tmp_path / "without_student"
    shutil.copytree(unzipped, folder, ignore=shutil.ignore_patterns("student.json", "models", "datasets"))
    proc, executed = execute(
        folder / "Assignment01_Part2_solution.ipynb", folder, tmp_path / "P2.ipynb", until="start_"
    )
    assert proc.returncode != 0
    ename, evalue = error_line(executed)
    assert ename == "FileNotFoundError" and "student.json" in evalue and "\n" not in evalue
    assert "create it" in evalue
