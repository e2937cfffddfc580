"""The committed notebooks read as a report: no TensorFlow start-up noise, no stderr box, no truncated
progress bar, and no code that builds Markdown shown next to the text it renders."""

import re

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output

from conftest import REPO_ROOT

NOTEBOOKS = [f"Assignment01_Part{n}_solution.ipynb" for n in (1, 2, 3)]
NOISE = re.compile(r"cuda|cuinit|absl|onednn|cudart|tensorrt", re.IGNORECASE)
HIDDEN = {"remove_input", "remove_cell"}
KERAS_BAR = re.compile(r"(\d+)/(\d+) *━")
TQDM_BAR = re.compile(r"(\d+)%\|")


def output_text(output):
    """The text a reader sees for one output: a stream's text, or an execute_result/display_data's
    text/plain, text/markdown and text/html."""
    if output.get("output_type") == "stream":
        return output.get("text", "")
    data = output.get("data", {})
    return "\n".join("".join(data.get(kind, "")) for kind in ("text/plain", "text/markdown", "text/html"))


def reader_problems(notebook):
    """One line per thing a reader of the exported HTML should not see."""
    found = []
    for number, cell in enumerate(notebook.cells, 1):
        if cell.cell_type != "code":
            continue
        tags = set(cell.metadata.get("tags", []))
        if "Markdown(" in cell.source and not tags & HIDDEN:
            found.append(f"cell {number} builds Markdown but is not tagged remove_input")
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                found.append(f"cell {number} writes to stderr: {output.get('text', '')[:80]!r}")
            for line in re.split(r"[\r\n]", output_text(output)):
                if NOISE.search(line):
                    found.append(f"cell {number} shows start-up noise: {line[:80]!r}")
                keras = KERAS_BAR.search(line)
                if keras and keras.group(1) != keras.group(2):
                    found.append(f"cell {number} shows a truncated progress bar: {line[:80]!r}")
                tqdm = TQDM_BAR.search(line)
                if tqdm and tqdm.group(1) != "100":
                    found.append(f"cell {number} shows a truncated progress bar: {line[:80]!r}")
    return found


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_reads_as_a_report(name):
    notebook = nbformat.read(REPO_ROOT / name, as_version=4)
    assert reader_problems(notebook) == []


def notebook_with(source="print(1)", tags=(), **output):
    cell = new_code_cell(
        source, metadata={"tags": list(tags)}, outputs=[new_output(**output)] if output else []
    )
    return new_notebook(cells=[cell])


@pytest.mark.parametrize(
    "notebook, problem",
    [
        (notebook_with(output_type="stream", name="stderr", text="warning\n"), "stderr"),
        (
            notebook_with(
                output_type="stream", name="stdout", text="E0000 failed call to cuInit: INTERNAL\n"
            ),
            "noise",
        ),
        (notebook_with("display(Markdown(f'{x}'))"), "Markdown"),
        (notebook_with(output_type="stream", name="stdout", text="120/750 ━━━━━━━━ 3s\n"), "truncated"),
        (notebook_with(output_type="stream", name="stdout", text=" 45%|████      | 9/20\n"), "truncated"),
    ],
    ids=["stderr", "cuda line", "visible Markdown builder", "keras bar", "tqdm bar"],
)
def test_the_check_finds_what_a_reader_should_not_see(notebook, problem):
    found = reader_problems(notebook)
    assert len(found) == 1 and problem in found[0], found


def test_the_check_accepts_hidden_prose_and_finished_bars():
    clean = [
        notebook_with("display(Markdown(f'{x}'))", tags=["remove_input"]),
        notebook_with(output_type="stream", name="stdout", text="750/750 ━━━━━━━━ 3s\n100%|████| 20/20\n"),
    ]
    assert [reader_problems(notebook) for notebook in clean] == [[], []]
