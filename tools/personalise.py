"""Make the notebooks agree with student.json (`make student` calls it from the project root).

    python tools/personalise.py [--blocks] NOTEBOOK.ipynb ...

Two steps, with no training and no attack run (`--blocks`: the first alone, which `make run` takes before
executing every notebook):

1. Each notebook's Student Information block, a Markdown cell tagged `student-info` right after the title
   cell, is written from student.json (inserted where there is none). A Markdown cell is text, not an
   output: nothing is executed for it, and the notebook's outputs stay those of its last run.
2. Each notebook whose answers depend on the student ID (its `parameters` cell assigns STUDENT_ID: Part 1,
   whose Question 1.3 draws its weights from the ID) is executed top to bottom in the full profile with
   papermill, as `export_html.sh --execute` does. The notebook is replaced only when the run succeeds;
   otherwise its outputs and results/part*.json are left as they were, so that a notebook's outputs and
   its results always come from one run.

student.json is checked first (report.read_student): a bad value stops everything with one line naming it.
`make submission` (tools/make_submission.py) refuses to build a zip while `problems` finds anything, and
export_html.sh (tools/export_notebooks.py) refuses to export a notebook whose block differs from the
student.json beside it (`block_problem`). Paths are relative to the current folder (the project root).
"""

import argparse
import ast
import json
import os
import subprocess
import sys
import time
from itertools import zip_longest
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # report.py, in the project root

from report import read_student  # noqa: E402

TAG = "student-info"
CELL_ID = "student-information"
# The characters that Markdown (emphasis, code, links, strikethrough) or HTML (tags, entities) would read in
# a value of the block, written with a backslash so that they show as typed. "$" and "\" are refused by
# report.read_student instead: MathJax would read them as a formula in the HTML whatever the Markdown says.
MARKUP = "`*_[]<>&~"
EXAMPLE_ID = 1234  # the template's student ID, kept by the committed example
PART1_RESULTS = Path("results") / "part1.json"
FIX = "run `make student`"


def escape(text):
    """``text`` with each character of MARKUP backslash-escaped, so that Markdown shows it as typed."""
    return "".join(f"\\{char}" if char in MARKUP else char for char in str(text))


def student_block(student):
    """The Markdown source of the Student Information block for ``student`` (report.read_student's dict):
    the template's five lines, each value shown exactly as typed."""
    s = {key: escape(value) for key, value in student.items()}
    return (
        "## Student Information\n"
        f"**Surname:** {s['surname']} <br>\n"
        f"**Firstname:** {s['first_name']} <br>\n"
        f"**Student ID:** {s['student_id']} <br>\n"
        f"**Email:** {s['email']} <br>\n"
        f"**Your tutorial time:** {s['tutorial_time']}"
    )


def blocks(cells):
    """The cells (nbformat nodes or the raw JSON dicts) tagged as a Student Information block."""
    return [cell for cell in cells if TAG in cell.get("metadata", {}).get("tags", [])]


def with_block(notebook, source):
    """Give ``notebook`` (an nbformat node, changed in place) exactly one Student Information block holding
    ``source``: the first tagged cell rewritten and any other removed, or a new Markdown cell after the title
    cell. Returns True when anything changed."""
    found = blocks(notebook.cells)
    if len(found) == 1 and found[0].source == source:
        return False
    if found:
        found[0].source = source
        notebook.cells = [cell for cell in notebook.cells if not any(cell is c for c in found[1:])]
    else:
        cell = nbformat.v4.new_markdown_cell(source, metadata={"tags": [TAG]}, id=CELL_ID)
        notebook.cells.insert(min(1, len(notebook.cells)), cell)
    return True


def reads_student_id(notebook):
    """Whether the `parameters` cell of ``notebook`` assigns STUDENT_ID (its answers depend on the ID)."""
    for cell in notebook.cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            nodes = [node for node in ast.walk(ast.parse(cell.source)) if isinstance(node, ast.Assign)]
            return any(isinstance(t, ast.Name) and t.id == "STUDENT_ID" for n in nodes for t in n.targets)
    return False


def write_notebook(notebook, path):
    """Write ``notebook`` to ``path`` atomically (temporary file, then rename)."""
    partial = path.with_name(path.name + ".partial")
    nbformat.write(notebook, partial)
    os.replace(partial, path)


def execute(path):
    """Run the notebook ``path`` top to bottom in the full profile with papermill into runs/full/, then
    replace ``path`` with the executed copy. Papermill's and the kernel's log lines are shown only on
    failure; then (and on Ctrl-C) results/part*.json are restored as they were, and the script exits with
    one line naming the failed run."""
    executed = Path("runs") / "full" / path.name
    executed.parent.mkdir(parents=True, exist_ok=True)
    saved = {result: result.read_bytes() for result in Path("results").glob("part*.json")}
    command = [sys.executable, "-m", "papermill", str(path), str(executed), "-p", "PROFILE", "full"]
    command += ["-k", "python3", "--cwd", os.getcwd(), "--log-level", "WARNING", "--no-progress-bar"]
    succeeded = False
    try:
        run = subprocess.run(command, stderr=subprocess.PIPE, text=True)
        succeeded = run.returncode == 0
        if not succeeded:
            sys.stderr.write(run.stderr)
    finally:
        if not succeeded:
            for result in Path("results").glob("part*.json"):
                if result not in saved:
                    result.unlink()
            for result, content in saved.items():
                result.write_bytes(content)
    if not succeeded:
        sys.exit(
            f"error: executing {path} failed; its outputs and results/ are as before (the run: {executed})"
        )
    os.replace(executed, path)


def placeholders(student):
    """The fields of ``student`` that still hold the template's placeholders ("[Enter ...]", ID 1234)."""
    found = [key for key, value in student.items() if isinstance(value, str) and "[Enter" in value]
    return found + ([f"student_id {EXAMPLE_ID}"] if student["student_id"] == EXAMPLE_ID else [])


def block_problem(path, student):
    """One line saying how the Student Information block of the notebook ``path`` differs from
    ``student``, with the command that fixes it; None when it shows exactly ``student``."""
    found = blocks(json.loads(Path(path).read_text(encoding="utf-8"))["cells"])
    if len(found) != 1:
        return (
            f"{path} has {len(found)} Student Information blocks (Markdown cells tagged {TAG}), not 1: {FIX}"
        )
    expected = student_block(student)
    shown = "".join(found[0]["source"])
    if shown == expected:
        return None
    lines = zip_longest(shown.splitlines(), expected.splitlines(), fillvalue="")
    old, new = next((old, new) for old, new in lines if old != new)  # the first line that differs
    old, new = old.removesuffix(" <br>"), new.removesuffix(" <br>")
    return f'{path}\'s Student Information block says "{old}", student.json "{new}": {FIX}'


def part1_problem(student):
    """One line saying that Part 1's Question 1.3 (results/part1.json) was computed for another student ID
    than ``student``'s, or is missing, with the command that fixes it; None when it is for that ID."""
    if not PART1_RESULTS.is_file():
        return f"{PART1_RESULTS} is missing (Part 1 has not run here): {FIX}"
    computed = json.loads(PART1_RESULTS.read_text()).get("q1_3", {}).get("student_id")
    if computed != student["student_id"]:
        return (
            f"Part 1's Question 1.3 was computed for student ID {computed} ({PART1_RESULTS}), not for "
            f"{student['student_id']} (student.json): {FIX}"
        )
    return None


def problems(notebooks, example=False):
    """Why the notebooks and results/ do not agree with student.json, one line each ([] when they do): a
    missing or bad student.json, the template's placeholders (accepted when ``example``), a notebook whose
    Student Information block differs, Part 1 computed for another ID."""
    try:
        student = read_student()
    except (FileNotFoundError, ValueError) as error:
        return [str(error)]
    found = []
    left = placeholders(student)
    if left and not example:
        found.append(
            f"student.json still holds the template's placeholders ({', '.join(left)}): write your own "
            f"details there, then {FIX} (or build the example: `make submission EXAMPLE=1`)"
        )
    found += [block_problem(notebook, student) for notebook in notebooks]
    found.append(part1_problem(student))
    return [line for line in found if line]


def write_blocks(paths, source):
    """Write the block ``source`` into each notebook of ``paths`` that does not show it yet, printing one
    line per notebook; return the notebooks whose answers depend on the student ID."""
    dependent = []
    for path in paths:
        notebook = nbformat.read(path, as_version=4)
        if with_block(notebook, source):
            write_notebook(notebook, path)
            print(f"{path}: Student Information block written (a Markdown cell: nothing executed)")
        else:
            print(f"{path}: Student Information block already up to date")
        if reads_student_id(notebook):
            dependent.append(path)
    return dependent


def main(argv):
    """`make student`: write the block into every notebook given, re-execute those that read the student ID
    (unless --blocks), then check that everything agrees (``problems``); print one line per step."""
    parser = argparse.ArgumentParser(description="Make the notebooks agree with student.json.")
    parser.add_argument("--blocks", action="store_true", help="write the Student Information blocks only")
    parser.add_argument("notebooks", nargs="+", type=Path)
    args = parser.parse_args(argv)
    try:
        student = read_student()
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(
        f"student.json: {student['first_name']} {student['surname']}, student ID {student['student_id']}, "
        f"{student['email']}, tutorial {student['tutorial_time']}"
    )
    dependent = write_blocks(args.notebooks, student_block(student))
    if args.blocks:
        return
    for path in dependent:
        print(f"{path}: its answers depend on the student ID; executing it in the full profile ...")
        started = time.perf_counter()
        execute(path)
        print(f"{path}: executed in {time.perf_counter() - started:.0f} s")
    found = problems(args.notebooks, example=True)
    if found:
        sys.exit("\n".join(f"error: {line}" for line in found))
    print(
        f"done: every notebook shows student.json's details, and {PART1_RESULTS} holds Question 1.3 for "
        f"student ID {student['student_id']}"
    )
    left = placeholders(student)
    if left:
        print(
            f"note: student.json still holds the template's placeholders ({', '.join(left)}): "
            "`make submission` refuses them (`make submission EXAMPLE=1` builds the example)"
        )
    else:
        print("next: make submission")


if __name__ == "__main__":
    main(sys.argv[1:])
