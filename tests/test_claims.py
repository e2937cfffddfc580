"""What the committed notebooks claim: every sentence of their rendered prose that uses a comparative word
(report.COMPARATIVE_WORDS) carries the words of a comparison recorded in results/partN.json["comparisons"];
every recorded comparison's words are what report.compare / report.rank give for its figures; no generated
clause (a record's words with the lead-in the prose gives them) names a qualifier twice; and every question
heading is followed by its bold answer line, the first thing a reader of the report sees under it. The
checks are also run on small notebooks with a planted fault, so that each can be seen to fail, and on the
notebooks executed in the quick profile, whose words come from the report.compare of this checkout."""

import json
import re

import nbformat
import numpy as np
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from conftest import REPO_ROOT
from report import COMPARATIVE_WORDS, compare, rank, rerender

PARTS = [1, 2, 3]
HIDDEN_INPUT, HIDDEN_CELL = {"remove_input"}, {"remove_cell", "injected-parameters"}
COMPARATIVE = re.compile(r"\b(" + "|".join(re.escape(w) for w in COMPARATIVE_WORDS) + r")\b", re.IGNORECASE)
QUESTION_HEADING = re.compile(r"^#{1,6}\s*Question\s+\d+\.\d+\b.*$", re.MULTILINE)
# A qualifier: a word of four letters or more, or a name with a digit ("PGD-20"), but not a function word.
WORD = re.compile(r"[A-Za-z][A-Za-z0-9-]*")
FUNCTION_WORDS = set("with from than that this these those their against each over".split())


def committed(part):
    """The committed notebook of ``part`` and its recorded comparisons ({id: record}, {} if none)."""
    notebook = nbformat.read(REPO_ROOT / f"Assignment01_Part{part}_solution.ipynb", as_version=4)
    results = json.loads((REPO_ROOT / "results" / f"part{part}.json").read_text())
    return notebook, results.get("comparisons", {})


def markdown_outputs(cell):
    """The text/markdown outputs of a code cell, in order."""
    return [
        "".join(o["data"]["text/markdown"])
        for o in cell.get("outputs", [])
        if "text/markdown" in o.get("data", {})
    ]


def rendered_prose(notebook):
    """The prose a reader of the exported report reads: Markdown cells, and the Markdown that cells whose code
    is hidden (tag remove_input) render."""
    texts = []
    for cell in notebook.cells:
        tags = set(cell.metadata.get("tags", []))
        if cell.cell_type == "markdown":
            texts.append(cell.source)
        elif tags & HIDDEN_INPUT and not tags & HIDDEN_CELL:
            texts.extend(markdown_outputs(cell))
    return texts


def sentences(text):
    """``text`` with its whitespace collapsed, split after each '.', '!' or '?' that a space follows."""
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]


def unsupported_claims(notebook, comparisons):
    """The sentences that use a comparative word but contain the words of no recorded comparison."""
    recorded = [record["words"] for record in comparisons.values()]
    return [
        sentence
        for text in rendered_prose(notebook)
        for sentence in sentences(text)
        if COMPARATIVE.search(sentence) and not any(words in sentence for words in recorded)
    ]


def stale_records(comparisons):
    """The ids of the records whose stored words are not what their figures give."""
    return [key for key, record in comparisons.items() if record["words"] != rerender(record)]


def generated_clauses(notebook, comparisons):
    """Each place the rendered prose carries a recorded comparison's words, with the lead-in the prose gives
    them: from the last ';' or ':' before the words (or the sentence's start, or the end of the record's
    words before them) to the words' end, e.g. "under PGD-20, a gain, 0.132 → 0.207 (...)"."""
    recorded = {record["words"] for record in comparisons.values()}
    clauses = []
    for text in rendered_prose(notebook):
        for sentence in sentences(text):
            spans = sorted(
                (match.start(), match.start() + len(words))
                for words in recorded
                for match in re.finditer(re.escape(words), sentence)
            )
            done = 0
            for start, end in spans:
                if start < done:  # inside the words of another record
                    continue
                lead = max(done, sentence.rfind(";", 0, start) + 1, sentence.rfind(":", 0, start) + 1)
                clauses.append(sentence[lead:end].strip())
                done = end
    return clauses


def stutters(notebook, comparisons):
    """The generated clauses (``generated_clauses``) that name a qualifier twice, each as (clause, the
    repeated qualifiers): "under PGD-20, a significant gain in test accuracy under PGD-20" names "under" and
    "PGD-20" twice."""
    found = []
    for clause in generated_clauses(notebook, comparisons):
        names = [
            word.lower()
            for word in WORD.findall(clause)
            if (len(word) >= 4 or any(c.isdigit() for c in word)) and word.lower() not in FUNCTION_WORDS
        ]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            found.append((clause, repeated))
    return found


def reader_view(notebook):
    """What the report shows, in order: ("heading", line) for each question heading, ("text", Markdown)
    for the rest of a Markdown cell, ("code", source) for shown code, ("answer", Markdown) for the Markdown
    a hidden cell renders and ("output", kind) for any other output."""
    seen = []
    for cell in notebook.cells:
        tags = set(cell.metadata.get("tags", []))
        if tags & HIDDEN_CELL:
            continue
        if cell.cell_type == "markdown":
            done = 0
            for match in QUESTION_HEADING.finditer(cell.source):
                if cell.source[done : match.start()].strip():
                    seen.append(("text", cell.source[done : match.start()]))
                seen.append(("heading", match.group().strip()))
                done = match.end()
            if cell.source[done:].strip():
                seen.append(("text", cell.source[done:]))
            continue
        if not tags & HIDDEN_INPUT:
            seen.append(("code", cell.source))
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if tags & HIDDEN_INPUT and "text/markdown" in data:
                seen.append(("answer", "".join(data["text/markdown"])))
            elif output.get("output_type") == "stream" or any("".join(v).strip() for v in data.values()):
                seen.append(("output", output.get("output_type")))
    return seen


def unanswered_questions(notebook):
    """The question headings not followed, as the first thing shown under them, by a bold answer line that a
    hidden cell renders (Markdown starting with '**')."""
    view = reader_view(notebook)
    return [
        text
        for (kind, text), after in zip(view, view[1:] + [("end", "")])
        if kind == "heading" and not (after[0] == "answer" and after[1].lstrip().startswith("**"))
    ]


def headings(notebook):
    return [text for kind, text in reader_view(notebook) if kind == "heading"]


# What each question asks for, as patterns (case-insensitive) its answer line must contain: the quantities
# the assignment asks it to report. FIRST_CLAUSE: for the questions that ask for a verdict (did it learn?
# which case is better? did SAM help?), the verdict in words, in the answer's first clause (before its first
# ':' or ';', after a leading "Answer:").
ASKED = {
    "Question 1.1": [r"range", r"derivative"],
    "Question 1.2": [r"h\^\{?1", r"h\^\{?2", r"h\^\{?3", r"probabilit", r"cross-entropy", r"label smoothing"],
    "Question 1.3": [r"predict", r"cross-entropy", r"derivative|gradient", r"updated", r"W\^\{?2", r"b\^\{?2",
                     r"W\^\{?1", r"b\^\{?1"],
    "Question 2.1": [r"training", r"test", r"28 × 28"],
    "Question 2.2": [r"training", r"validation", r"test"],
    "Question 2.3": [r"images", r"label"],
    "Question 2.4": [r"test accuracy"],
    "Question 2.5": [r"best", r"test"],
    "Question 2.6": [r"0\.1\b", r"0\.15\b", r"0\.2\b", r"test"],
    "Question 3.1": [r"did not learn|learned", r"problem", r"learning rate", r"improve|fix"],
    "Question 3.2": [r"YourModel", r"skip connection"],
    "Question 3.3": [r"better", r"overfit"],
    "Question 3.4": [r"best", r"num_blocks", r"use_skip", r"learning_rate", r"test"],
    "Question 3.5": [r"augmentation", r"early stopping"],
    "Question 3.6": [r"with augmentation", r"without"],
    "Question 3.7": [r"mixup", r"test"],
    "Question 3.8": [r"clean", r"FGSM", r"PGD", r"MIM"],
    "Question 3.9": [r"clean", r"FGSM", r"PGD", r"MIM", r"models/"],
    "Question 3.10": [r"SAM", r"clean", r"test"],
}  # fmt: skip
FIRST_CLAUSE = {
    "Question 3.1": r"\b(no|yes)\b|did not learn|learned",
    "Question 3.3": r"better",
    "Question 3.6": r"augmentation (raises|lowers|does not)|no measurable",
    "Question 3.10": r"\b(no|yes)\b|did not|does not|raised|improved",
}


def answer_lines(notebook):
    """{question ("Question 3.3"): the bold answer line under its heading} for the answered questions."""
    view = reader_view(notebook)
    return {
        re.search(r"Question\s+\d+\.\d+", text).group(): after[1]
        for (kind, text), after in zip(view, view[1:])
        if kind == "heading" and after[0] == "answer"
    }


def first_clause(line):
    """The answer line's first clause: up to its first ':' or ';', after the bold mark and "Answer:"."""
    text = re.sub(r"^\W*answer(\s*\([^)]*\))?:\s*", "", line.lstrip("* \n"), flags=re.IGNORECASE)
    return re.split(r"[:;]", text, maxsplit=1)[0]


def unasked_answers(notebook):
    """(question, what is missing) for each answer line that does not name a quantity its question asks
    for (``ASKED``), or whose first clause does not give the verdict asked for (``FIRST_CLAUSE``)."""
    missing = []
    for question, line in answer_lines(notebook).items():
        missing += [
            (question, pattern) for pattern in ASKED.get(question, []) if not re.search(pattern, line, re.I)
        ]
        verdict = FIRST_CLAUSE.get(question)
        if verdict and not re.search(verdict, first_clause(line), re.I):
            missing.append((question, f"first clause: {verdict}"))
    return missing


# --- the committed notebooks -------------------------------------------------------------------------------


@pytest.mark.parametrize("part", PARTS)
def test_every_comparative_sentence_carries_a_recorded_comparison(part):
    notebook, comparisons = committed(part)
    assert unsupported_claims(notebook, comparisons) == []
    assert stale_records(comparisons) == []


@pytest.mark.parametrize("part", PARTS)
def test_no_generated_clause_repeats_a_qualifier(part):
    notebook, comparisons = committed(part)
    assert stutters(notebook, comparisons) == []


@pytest.mark.parametrize("part", PARTS)
def test_every_question_opens_with_its_bold_answer_line(part):
    notebook, _ = committed(part)
    assert headings(notebook), "no question headings found"
    assert unanswered_questions(notebook) == []


@pytest.mark.parametrize("part", PARTS)
def test_every_answer_line_names_what_its_question_asks_for(part):
    notebook, _ = committed(part)
    asked = {question for question in ASKED if question.startswith(f"Question {part}.")}
    assert set(answer_lines(notebook)) == asked
    assert unasked_answers(notebook) == []


# --- the checks fail on planted faults ---------------------------------------------------------------------


def hidden(markdown):
    """A code cell with hidden input that rendered ``markdown``."""
    output = new_output("display_data", data={"text/markdown": markdown, "text/plain": "<Markdown>"})
    return new_code_cell("display(Markdown(...))", metadata={"tags": ["remove_input"]}, outputs=[output])


@pytest.fixture
def recorded():
    """A comparison on 40 images (B right on 12 more) and a ranking, as the notebooks record them."""
    a = np.array([True] * 20 + [False] * 20)
    b = np.array([True] * 32 + [False] * 8)
    return {
        "b_vs_a": compare("A", "B", "test accuracy", correct_a=a, correct_b=b),
        "grid_largest": rank({"20-20": 0.871, "40-40": 0.888}, "validation accuracy", "largest", ".3f"),
    }


def test_a_claim_built_from_a_record_passes(recorded):
    words = recorded["b_vs_a"]["words"]
    assert words.startswith("a gain,") and "significant" in words
    notebook = new_notebook(
        cells=[
            new_markdown_cell("Mixup is not better or worse here: nothing was compared."),
            hidden(f"Against A: {words}. The grid has {recorded['grid_largest']['words']}."),
        ]
    )
    assert unsupported_claims(notebook, recorded) == [
        "Mixup is not better or worse here: nothing was compared."
    ]
    notebook.cells.pop(0)
    assert unsupported_claims(notebook, recorded) == []


@pytest.mark.parametrize(
    "planted",
    [
        "Smoothing gives a significant gain in test accuracy of +0.050.",
        "The wider network is better.",
        "SAM HELPS on the attacked images.",
        "Augmentation costs a loss of 0.02 in accuracy.",
    ],
)
def test_a_planted_claim_without_its_record_fails(recorded, planted):
    notebook = new_notebook(cells=[hidden(f"First sentence. {planted} Last sentence.")])
    assert unsupported_claims(notebook, recorded) == [planted]
    notebook = new_notebook(cells=[new_markdown_cell(planted)])
    assert unsupported_claims(notebook, recorded) == [planted]


def test_a_record_whose_words_disagree_with_its_figures_fails(recorded):
    assert stale_records(recorded) == []
    tampered = {key: dict(record) for key, record in recorded.items()}
    tampered["b_vs_a"]["b"] = tampered["b_vs_a"]["a"]  # the same figures: no gain, yet the words claim one
    tampered["grid_largest"]["values"] = {"20-20": 0.899, "40-40": 0.888}  # another winner
    assert stale_records(tampered) == ["b_vs_a", "grid_largest"]
    reworded = {"b_vs_a": dict(recorded["b_vs_a"], words=recorded["b_vs_a"]["words"].replace("gain", "loss"))}
    assert stale_records(reworded) == ["b_vs_a"]


def test_a_question_without_its_answer_line_first_fails():
    heading = new_markdown_cell("## Part 9\n\n### Question 9.1. Do it")
    answered = [heading, hidden("**Answer: 0.88.**"), new_code_cell("x = 1")]
    assert unanswered_questions(new_notebook(cells=answered)) == []
    prose_first = new_markdown_cell("## Question 9.1: do it\n\nSome text.")
    faults = [
        [heading, new_code_cell("x = 1"), hidden("**Answer: 0.88.**")],  # the code comes first
        [heading, hidden("Answer: 0.88.")],  # not bold
        [heading, hidden("*(answer pending: computed further down)*")],  # the slot was never filled
        [heading],  # no answer at all
    ]
    for cells in faults:
        assert unanswered_questions(new_notebook(cells=cells)) == ["### Question 9.1. Do it"]
    assert unanswered_questions(new_notebook(cells=[prose_first, hidden("**Answer: 0.88.**")])) == [
        "## Question 9.1: do it"
    ]


def test_an_answer_line_that_does_not_name_its_quantity_fails():
    heading = new_markdown_cell("## Question 3.3: with and without the skip connection")
    good = "**Neither case is better by a measurable margin: validation 0.620 → 0.638; both overfit.**"
    assert unasked_answers(new_notebook(cells=[heading, hidden(good)])) == []
    numbers_first = "**With against without, validation: 0.620 → 0.638; neither is better; both overfit.**"
    no_overfitting = "**Neither case is better by a measurable margin: validation 0.620 → 0.638.**"
    assert unasked_answers(new_notebook(cells=[heading, hidden(numbers_first)])) == [
        ("Question 3.3", f"first clause: {FIRST_CLAUSE['Question 3.3']}")
    ]
    assert unasked_answers(new_notebook(cells=[heading, hidden(no_overfitting)])) == [
        ("Question 3.3", "overfit")
    ]
    sgd = new_markdown_cell("## Question 1.3: forward and backward propagation, and one SGD step")
    loss_only = (
        "**Answer: predicted class 3, cross-entropy 0.40, derivatives in (e)-(f); after the step 0.39.**"
    )
    assert [pattern for _, pattern in unasked_answers(new_notebook(cells=[sgd, hidden(loss_only)]))] == [
        "updated", r"W\^\{?2", r"b\^\{?2", r"W\^\{?1", r"b\^\{?1"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "lead_in, words, repeated",
    [
        # the stutter of the notebooks before: the qualifier in the lead-in and again in the words
        (
            "SAM on half the steps: under PGD-20, ",
            "a significant gain in test accuracy under PGD-20 (2 seeds pooled) of +0.075 (0.132 → 0.207; "
            "McNemar p = 3.3e-14, 90 vs 15 discordant images)",
            ["pgd-20", "under"],
        ),
        ("Mixup: on validation, ", "no measurable change in validation accuracy: +0.006", ["validation"]),
        (
            "Under PGD-20, a significant difference: ",
            "a significant gain of +0.068, significant",
            ["significant"],
        ),
    ],
)
def test_a_planted_stutter_fails(lead_in, words, repeated):
    record = {"planted": {"kind": "comparison", "words": words}}
    notebook = new_notebook(cells=[hidden(f"First sentence. {lead_in}{words}. Last sentence.")])
    assert stutters(notebook, record) == [((lead_in.rsplit(":", 1)[-1] + words).strip(), repeated)]


def test_compare_words_in_the_notebooks_lead_ins_say_each_qualifier_once():
    """The words of every kind of comparison (gain, loss, no measurable change; McNemar, Welch, one seed)
    after the lead-ins the notebooks give them, two comparisons to a sentence."""
    a, b = np.array([True] * 20 + [False] * 20), np.array([True] * 32 + [False] * 8)
    metric = "test accuracy under PGD-20 (2 seeds pooled)"
    records = {
        "gain": compare("plain", "SAM", metric, correct_a=a, correct_b=b),
        "loss": compare("SAM", "plain", "validation accuracy", correct_a=b, correct_b=a),
        "flat": compare("A", "B", "test accuracy", correct_a=a, correct_b=a[::-1]),
        "welch": compare("A", "B", "validation accuracy", values_a=[0.80, 0.801], values_b=[0.85, 0.851]),
        "seed": compare("A", "B", "validation accuracy", values_a=[0.80], values_b=[0.90]),
    }
    assert [record["direction"] for record in records.values()] == [
        "gain", "loss", "no measurable change", "gain", "no measurable change"
    ]  # fmt: skip
    prose = " ".join(
        f"* {key}: under PGD-20, {record['words']}; on validation, {record['words']}."
        for key, record in records.items()
    )
    notebook = new_notebook(cells=[hidden(prose)])
    assert len(generated_clauses(notebook, records)) == 2 * len(records)
    assert stutters(notebook, records) == []
    assert unsupported_claims(notebook, records) == [] and stale_records(records) == []


def check_quick_profile_words(checkout, notebook):
    """A notebook executed in the quick profile (the session's shared run, see conftest; test_foundation's
    quick-profile test calls this on it, so that no notebook runs twice) with this checkout's report.compare:
    every comparative sentence carries a record's words, every record's words are rerender's, and no generated
    clause repeats a qualifier, whatever the committed notebooks still say."""
    out = checkout / "runs" / "quick"
    executed = nbformat.read(out / notebook, as_version=4)
    part = notebook.split("_")[1].lower()
    comparisons = json.loads((out / "results" / f"{part}.json").read_text())["comparisons"]
    assert comparisons and generated_clauses(executed, comparisons)
    assert unsupported_claims(executed, comparisons) == []
    assert stale_records(comparisons) == []
    assert stutters(executed, comparisons) == []
