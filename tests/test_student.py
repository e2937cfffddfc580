"""student.json is read strictly (a missing file or a bad value is one line naming it and what is allowed),
and the Student Information block that `make student` writes from it shows every value exactly as typed."""

import html
import json
import re
import string
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nbconvert.filters.markdown_mistune import markdown2html_mistune

from conftest import REPO_ROOT
from report import read_student

sys.path.insert(0, str(REPO_ROOT / "tools"))
from personalise import student_block  # noqa: E402

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
