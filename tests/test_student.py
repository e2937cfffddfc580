"""A student's own submission: student.json is read strictly (a bad value is one line naming it) and shown
exactly as typed; in a copy of the project, `make submission` refuses until everything agrees with
student.json, `make student` makes it agree in under two minutes without training, and the zip it then
builds is named for that student and shows them everywhere, Part 1's Question 1.3 computed for their ID
(checked against NumPy here)."""

import html
import json
import re
import shutil
import string
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import nbformat
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nbconvert.filters.markdown_mistune import markdown2html_mistune

from conftest import REPO_ROOT, checkout_copy, run
from report import read_student

sys.path.insert(0, str(REPO_ROOT / "tools"))
from personalise import student_block  # noqa: E402

NOTEBOOKS = [f"Assignment01_Part{n}_solution.ipynb" for n in (1, 2, 3)]
STUDENT = {
    "surname": "Nguyễn",
    "first_name": "Thị Ánh",
    "student_id": 31415926,
    "email": "thi_anh.nguyen@student.monash.edu",
    "tutorial_time": "Wed 10:00 & 14:00 <Lab *3*>",
}
LABELS = {
    "Surname": "surname",
    "Firstname": "first_name",
    "Student ID": "student_id",
    "Email": "email",
    "Your tutorial time": "tutorial_time",
}


def write_student(folder, student=None, text=None):
    """student.json in ``folder``: ``student`` as JSON, or ``text`` as it is; returns its path."""
    path = folder / "student.json"
    path.write_text(text if text is not None else json.dumps(student, ensure_ascii=False), encoding="utf-8")
    return path


def shown(rendered_html):
    """What a reader sees of a rendered Student Information block: {student.json key: text}, tags dropped,
    entities decoded, white space collapsed as a browser does."""
    lines = re.sub(r"<br\s*/?>|</h\d>|</p>", "\n", rendered_html)  # where a browser breaks the line
    text = html.unescape(re.sub(r"<[^>]+>", "", lines))
    fields = [line.split(":", 1) for line in text.splitlines() if ":" in line]
    return {LABELS[label]: " ".join(value.split()) for label, value in fields if label in LABELS}


def typed(student):
    """``student``'s values as text, white space collapsed (what ``shown`` should give back)."""
    return {key: " ".join(str(value).split()) for key, value in student.items()}


# --- student.json: bad input is one line; the rest is shown as typed ---------------------------------------


@pytest.mark.parametrize(
    "text, named",
    [
        ('{"surname": "Lee", "first_name": "Ana" "student_id": 1}', "not valid JSON"),
        ("[1, 2]", "one JSON object"),
        (json.dumps({**STUDENT, "email": ""}), "email is empty"),
        (json.dumps({k: v for k, v in STUDENT.items() if k != "tutorial_time"}), "no tutorial_time"),
        (json.dumps({**STUDENT, "first_name": "   "}), "first_name is empty"),
        (json.dumps({**STUDENT, "surname": 42}), "surname must be text"),
        (json.dumps({**STUDENT, "student_id": "3141592six"}), "'3141592six'"),
        (json.dumps({**STUDENT, "student_id": -31415926}), "-31415926"),
        (json.dumps({**STUDENT, "student_id": 2**32}), "4294967296"),
        (json.dumps({**STUDENT, "student_id": 3.5}), "3.5"),
        (json.dumps({**STUDENT, "student_id": True}), "True"),
        (json.dumps({**STUDENT, "surname": "Price $5"}), "'$'"),
        (json.dumps({**STUDENT, "surname": "back\\slash"}), "'\\\\'"),
        (json.dumps({**STUDENT, "first_name": "two\nlines"}), "'\\n'"),
        (json.dumps({**STUDENT, "email": "a@b.c\u2028d"}), "'\\u2028'"),
    ],
    ids=[
        "malformed",
        "not-an-object",
        "empty-email",
        "missing-key",
        "blank-name",
        "number-as-name",
        "non-numeric-id",
        "negative-id",
        "id-too-large",
        "fractional-id",
        "boolean-id",
        "dollar",
        "backslash",
        "line-break",
        "line-separator",
    ],
)
def test_bad_student_json_is_one_line_naming_the_value(tmp_path, text, named):
    path = write_student(tmp_path, text=text)
    with pytest.raises(ValueError) as info:
        read_student(path)
    message = str(info.value)
    assert named in message and str(path) in message and "\n" not in message


def test_a_missing_student_json_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="create it with the keys"):
        read_student(tmp_path / "student.json")


def test_an_id_in_quotes_is_read_as_the_number(tmp_path):
    assert (
        read_student(write_student(tmp_path, {**STUDENT, "student_id": "31415926"}))["student_id"] == 31415926
    )


def test_markdown_and_html_characters_and_accents_are_shown_as_typed(tmp_path):
    student = read_student(write_student(tmp_path, STUDENT))
    assert student == STUDENT
    assert shown(markdown2html_mistune(student_block(student))) == typed(STUDENT)


ALLOWED = st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"), blacklist_characters="$\\")
MARKUP = st.sampled_from([c for c in string.punctuation if c not in "$\\"])  # what Markdown and HTML read


@given(st.text(st.one_of(MARKUP, ALLOWED), min_size=1).filter(str.strip))
def test_any_accepted_text_is_shown_as_typed(value):
    """Whatever text read_student accepts in a field, the rendered block shows it unchanged."""
    entered = {**STUDENT, "surname": value, "tutorial_time": value}
    with tempfile.TemporaryDirectory() as folder:
        student = read_student(write_student(Path(folder), entered))
    assert shown(markdown2html_mistune(student_block(student))) == typed(entered)


# --- the whole way, in a copy of the project ---------------------------------------------------------------


def make(root, *args):
    """`make -s ARGS` in ``root``."""
    return run(["make", "-s", "--no-print-directory", *args], cwd=root)


def error_lines(proc):
    """The lines a refused command printed, make's own closing line ("make: ***", or "make[1]: ***" under
    `make test`) left out."""
    return [line for line in proc.stderr.splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", line)]


@pytest.fixture(scope="module")
def journey(tmp_path_factory):
    """A student's way through a copy of the committed project, every `make submission` kept by step:
    first as committed (the template's placeholders), with a STUDENT_ID= override, then after writing
    STUDENT into student.json; `make student` (timed); then with Part 1's committed results (ID 1234) put
    back, and with one notebook's block edited; each undone, then the zip built and unzipped."""
    root = tmp_path_factory.mktemp("student") / "project"
    root.mkdir()
    checkout_copy(root)
    (root / ".venv").symlink_to(Path(sys.prefix))
    out = tmp_path_factory.mktemp("zip")
    steps = {}

    def submit(step, *args):
        steps[step] = make(root, "submission", f"SUBMISSION_DIR={out}", *args)
        assert step == "built" or not list(out.iterdir()), f"{step}: a zip was built"

    submit("placeholders")
    submit("override", "STUDENT_ID=31415926")
    write_student(root, STUDENT)
    submit("not personalised")
    started = time.perf_counter()
    steps["student"] = make(root, "student")
    seconds = time.perf_counter() - started
    for step, path, stale in [
        ("part1 stale", root / "results" / "part1.json", (REPO_ROOT / "results" / "part1.json").read_bytes()),
        ("block stale", root / NOTEBOOKS[2], (root / NOTEBOOKS[2]).read_bytes().replace(b"Nguy", b"Ngu")),
    ]:
        current = path.read_bytes()
        path.write_bytes(stale)
        submit(step)
        path.write_bytes(current)
    submit("built")
    (archive,) = out.glob("*.zip")
    unzipped = tmp_path_factory.mktemp("unzipped")
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(unzipped)
    return SimpleNamespace(root=root, steps=steps, seconds=seconds, archive=archive, unzipped=unzipped)


@pytest.mark.notebook
def test_the_committed_placeholders_are_refused_in_one_line(journey):
    proc = journey.steps["placeholders"]
    (line,) = error_lines(proc)
    assert proc.returncode != 0 and "placeholders" in line and "student.json" in line
    assert "make student" in line and "EXAMPLE=1" in line


@pytest.mark.notebook
def test_a_student_id_override_is_refused(journey):
    proc = journey.steps["override"]
    (line,) = error_lines(proc)
    assert proc.returncode != 0 and "STUDENT_ID=31415926" in line and "student.json" in line


@pytest.mark.notebook
def test_notebooks_not_made_for_student_json_are_refused_one_line_each(journey):
    proc = journey.steps["not personalised"]
    lines = error_lines(proc)
    assert proc.returncode != 0 and len(lines) == 4 and all("make student" in line for line in lines)
    for notebook, line in zip(NOTEBOOKS, lines):
        assert notebook in line and "Student Information" in line and "Nguyễn" in line
    assert "1234" in lines[3] and "31415926" in lines[3] and "results/part1.json" in lines[3]


@pytest.mark.notebook
@pytest.mark.parametrize("step, named", [("part1 stale", "1234"), ("block stale", NOTEBOOKS[2])])
def test_one_stale_part_is_refused_alone(journey, step, named):
    proc = journey.steps[step]
    (line,) = error_lines(proc)
    assert proc.returncode != 0 and named in line and "make student" in line


@pytest.mark.notebook
def test_make_student_personalises_in_under_two_minutes_without_training(journey):
    proc = journey.steps["student"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert journey.seconds < 120, journey.seconds
    assert proc.stdout.count("Student Information block written") == 3
    assert "31415926" in proc.stdout.splitlines()[0] and "next: make submission" in proc.stdout
    for name in NOTEBOOKS[1:]:  # Parts 2 and 3: the block is all that changed
        before = nbformat.read(REPO_ROOT / name, as_version=4).cells
        after = nbformat.read(journey.root / name, as_version=4).cells
        assert [c for c in after if "student-info" not in c.metadata.get("tags", [])] == [
            c for c in before if "student-info" not in c.metadata.get("tags", [])
        ]


@pytest.mark.notebook
def test_the_zip_is_named_for_the_student_and_shows_them_everywhere(journey):
    assert journey.steps["built"].returncode == 0, journey.steps["built"].stderr[-3000:]
    assert journey.archive.name == "31415926_assignment01_solution.zip"
    assert json.loads((journey.unzipped / "student.json").read_text(encoding="utf-8")) == STUDENT
    for name in NOTEBOOKS:
        notebook = nbformat.read(journey.unzipped / name, as_version=4)
        (block,) = [c for c in notebook.cells if "student-info" in c.metadata.get("tags", [])]
        assert shown(markdown2html_mistune(block.source)) == typed(STUDENT), name
        page = (journey.unzipped / name.replace("_solution.ipynb", "_output.html")).read_text(
            encoding="utf-8"
        )
        section = re.search(r'id="Student-Information".*?</p>', page, re.DOTALL)
        assert section and shown(section.group()) == typed(STUDENT), name
        assert "[Enter" not in page and '<meta charset="utf-8"' in page.lower()
    part1 = nbformat.read(journey.unzipped / NOTEBOOKS[0], as_version=4)
    printed = "".join(o.get("text", "") for c in part1.cells if c.cell_type == "code" for o in c.outputs)
    assert "student ID 31415926" in printed and "student ID 1234" not in printed


@pytest.mark.notebook
def test_the_printed_html_shows_the_student(journey, tmp_path):
    """Part 1's HTML printed to PDF as a marker prints it (headless Chromium), read with pdftotext."""
    chromium = shutil.which("chromium-headless-shell") or shutil.which("chromium")
    if not (chromium and shutil.which("pdftotext")):
        pytest.skip("needs Chromium and pdftotext (Debian: chromium-headless-shell, poppler-utils)")
    page, pdf = journey.unzipped / NOTEBOOKS[0].replace("_solution.ipynb", "_output.html"), tmp_path / "p.pdf"
    printing = [chromium, "--headless", "--no-sandbox", "--no-pdf-header-footer", f"--print-to-pdf={pdf}"]
    assert run([*printing, page.as_uri()], timeout=120).returncode == 0
    text = run(["pdftotext", "-l", "1", str(pdf), "-"]).stdout
    for label, key in LABELS.items():
        assert f"{label}: {STUDENT[key]}" in text


def column(vector):
    """A 1-D array as a column (n, 1)."""
    return vector[:, None]


def numpy_q1_3(student_id):
    """Question 1.3 by hand in NumPy, on row vectors: the template's weights (np.random.seed(student_id),
    then rand for W1 (4, 3), b1 (4, 1), W2 (3, 4), b2 (3, 1)), x = (1, -1, 1.5), true class 3, Leaky ReLU
    (slope 0.01 below 0), softmax, cross-entropy; the backward pass through the softmax's full Jacobian;
    one SGD step with learning rate 0.01. Column shapes as results/part1.json stores them."""
    rng = np.random.RandomState(student_id)  # the stream np.random.seed(student_id) resets
    W1, b1, W2, b2 = rng.rand(4, 3), rng.rand(4, 1)[:, 0], rng.rand(3, 4), rng.rand(3, 1)[:, 0]
    x, y = np.array([1.0, -1.0, 1.5]), 2
    h1_bar = x @ W1.T + b1
    slope = np.where(h1_bar < 0, 0.01, 1.0)
    h1 = slope * h1_bar
    logits = h1 @ W2.T + b2
    p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    dloss_dp = -np.eye(3)[y] / p[y]
    dh2 = (np.diag(p) - np.outer(p, p)) @ dloss_dp
    dh1 = dh2 @ W2
    dh1_bar = dh1 * slope
    dW2, dW1 = np.outer(dh2, h1), np.outer(dh1_bar, x)
    return {
        "h1_bar": column(h1_bar),
        "h1": column(h1),
        "p": column(p),
        "predicted_class": int(np.argmax(p)) + 1,
        "loss": -np.log(p[y]),
        "dh2": column(dh2),
        "dW2": dW2,
        "db2": column(dh2),
        "dh1": column(dh1),
        "dh1_bar": column(dh1_bar),
        "dW1": dW1,
        "db1": column(dh1_bar),
        "W1_new": W1 - 0.01 * dW1,
        "b1_new": column(b1 - 0.01 * dh1_bar),
        "W2_new": W2 - 0.01 * dW2,
        "b2_new": column(b2 - 0.01 * dh2),
    }


@pytest.mark.notebook
def test_part1_in_the_zip_answers_question_1_3_for_the_student(journey):
    q1_3 = json.loads((journey.unzipped / "results" / "part1.json").read_text())["q1_3"]
    assert q1_3["student_id"] == 31415926
    expected = numpy_q1_3(31415926)
    assert set(q1_3) == set(expected) | {"student_id"}
    for key, value in expected.items():
        np.testing.assert_allclose(q1_3[key], value, rtol=1e-9, atol=1e-12, err_msg=key)


def test_the_numpy_reference_gives_the_committed_answers_for_1234():
    """The reference itself, against the committed results (ID 1234), so that a wrong reference fails here
    and not only in the slow test."""
    q1_3 = json.loads((REPO_ROOT / "results" / "part1.json").read_text())["q1_3"]
    for key, value in numpy_q1_3(1234).items():
        np.testing.assert_allclose(q1_3[key], value, rtol=1e-9, atol=1e-12, err_msg=key)
