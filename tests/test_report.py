"""report.py: McNemar's test and the stopwatch the notebooks use."""

import json
import math
import time

import numpy as np
import pytest

from report import Stopwatch, compare, mcnemar, rank, rerender, start_notebook


def exact_two_sided(k, n):
    """Two-sided exact binomial p-value at 1/2, by hand: twice the smaller tail, at most 1."""
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2**n
    return min(1.0, 2 * tail)


@pytest.mark.parametrize("a_only, b_only", [(10, 2), (2, 10), (7, 7), (30, 12), (0, 5)])
def test_mcnemar_is_the_exact_binomial_test_on_the_discordant_images(a_only, b_only):
    both, neither = 40, 25
    a = np.array([True] * a_only + [False] * b_only + [True] * both + [False] * neither)
    b = np.array([False] * a_only + [True] * b_only + [True] * both + [False] * neither)
    test = mcnemar(a, b)
    assert (test.a_only, test.b_only) == (a_only, b_only)
    assert test.p_value == pytest.approx(exact_two_sided(a_only, a_only + b_only), rel=1e-9)
    assert test.difference == pytest.approx((a_only - b_only) / len(a))
    assert test.significant == (test.p_value < 0.05)


def test_mcnemar_of_a_model_with_itself_is_not_significant():
    correct = np.random.default_rng(0).random(500) < 0.7
    test = mcnemar(correct, correct)
    assert (test.a_only, test.b_only, test.p_value, test.significant) == (0, 0, 1.0, False)


def test_mcnemar_refuses_masks_of_different_lengths():
    with pytest.raises(ValueError, match="one length"):
        mcnemar(np.ones(5, bool), np.ones(4, bool))


def test_stopwatch_adds_up_the_pieces_of_a_section():
    clock = Stopwatch()
    for _ in range(2):
        with clock("a"):
            time.sleep(0.05)
    with pytest.raises(RuntimeError), clock("b"):
        raise RuntimeError
    assert 0.1 <= clock.seconds["a"] < 0.5 and "b" in clock.seconds


def masks(a_only, b_only, both=300, neither=100):
    """Two (N,) correctness masks with the given discordant counts."""
    a = np.array([True] * a_only + [False] * b_only + [True] * both + [False] * neither)
    b = np.array([False] * a_only + [True] * b_only + [True] * both + [False] * neither)
    return a, b


def test_compare_calls_a_difference_a_gain_only_when_mcnemar_rejects_equality():
    a, b = masks(2, 20)
    gain = compare("A", "B", "validation accuracy", correct_a=a, correct_b=b)
    assert gain["direction"] == "gain" and gain["significant"]
    assert gain["difference"] == pytest.approx(18 / len(a))
    assert gain["p_value"] == pytest.approx(exact_two_sided(2, 22))
    # 0.7156 → 0.7583 at three decimals would read 0.716 → 0.758 (+0.043): four, so that the figures add up
    assert gain["words"] == "a gain, 0.7156 → 0.7583 (+0.0427, significant: McNemar p = 0.00012)"
    loss = compare("B", "A", "validation accuracy", correct_a=b, correct_b=a)
    assert loss["direction"] == "loss"
    assert loss["words"] == "a loss, 0.7583 → 0.7156 (-0.0427, significant: McNemar p = 0.00012)"
    a, b = masks(9, 12)
    flat = compare("A", "B", "test accuracy", correct_a=a, correct_b=b)
    assert flat["direction"] == "no measurable change" and not flat["significant"]
    assert flat["words"] == "no measurable change, 0.734 → 0.741 (+0.007, McNemar p = 0.66)"
    # the figures the words leave out stay in the record
    assert flat["metric"] == "test accuracy" and flat["detail"] == "12 vs 9 discordant images"
    assert (flat["a"], flat["b"]) == (pytest.approx(309 / 421), pytest.approx(312 / 421))


def test_compare_on_seed_means_uses_welchs_test_and_claims_nothing_from_one_seed():
    apart = compare(
        "A", "B", "validation accuracy", values_a=[0.80, 0.801, 0.799], values_b=[0.85, 0.851, 0.849]
    )
    assert apart["direction"] == "gain" and apart["test"] == "Welch t"
    assert apart["words"] == "a gain, 0.800 → 0.850 (+0.050, significant: Welch t p = 4.3e-07)"
    overlap = compare(
        "A", "B", "validation accuracy", values_a=[0.80, 0.83, 0.77], values_b=[0.81, 0.78, 0.84]
    )
    assert overlap["direction"] == "no measurable change"
    assert overlap["words"] == "no measurable change, 0.800 → 0.810 (+0.010, Welch t p = 0.7)"
    assert overlap["detail"] == "3 vs 3 seeds"
    single = compare("A", "B", "validation accuracy", values_a=[0.80], values_b=[0.90])
    assert single["direction"] == "no measurable change"
    assert single["words"] == "no measurable change, 0.800 → 0.900 (+0.100, no test with one seed)"


def test_compare_words_say_each_qualifier_once_and_leave_the_metric_to_the_sentence():
    """Each word once (the verdict, "significant", the test), and none of the metric's: the sentence around
    the words names it ("under PGD-20, a gain, ...")."""
    a, b = masks(2, 20)
    metric = "test accuracy under PGD-20 (2 seeds pooled)"
    for record in (
        compare("A", "B", metric, correct_a=a, correct_b=b),
        compare("B", "A", metric, correct_a=b, correct_b=a),
        compare("A", "B", metric, correct_a=a, correct_b=a),
        compare("A", "B", metric, values_a=[0.80, 0.801], values_b=[0.85, 0.851]),
    ):
        words = record["words"].replace("(", " ").replace(")", " ").replace(",", " ").replace(":", " ")
        names = [word for word in words.split() if word[0].isalpha()]
        assert len(names) == len(set(names)), record["words"]
        assert not {"test", "accuracy", "under", "PGD-20", "seeds", "pooled"} & set(names), record["words"]
        assert record["metric"] == metric


def test_a_significant_p_value_never_reads_as_alpha():
    """p = 0.0496 rounded to two digits would be "p = 0.05" beside "significant": it gets a third digit."""
    a, b = masks(2, 20)
    record = dict(compare("A", "B", "accuracy", correct_a=a, correct_b=b), p_value=0.0496)
    assert rerender(record).endswith("(+0.0427, significant: McNemar p = 0.0496)")
    assert rerender(dict(record, p_value=0.051)).endswith("(+0.0427, McNemar p = 0.051)")
    assert rerender(dict(record, p_value=0.00012345)).endswith("significant: McNemar p = 0.00012)")


def test_compare_refuses_mixed_or_missing_figures():
    with pytest.raises(ValueError, match="give correct_a"):
        compare("A", "B", "accuracy", correct_a=np.ones(3, bool), values_b=[0.5])


def test_rank_takes_the_extreme_of_the_table_and_rerender_gives_the_stored_words():
    table = {"augmentation": 0.040, "40 epochs": 0.044, "mixup": 0.006}
    top = rank(table, "validation accuracy gain")
    assert top["winner"] == "40 epochs" and "40 epochs (+0.044, of 3 rows)" in top["words"]
    assert rank(table, "validation accuracy gain", "smallest")["winner"] == "mixup"
    a, b = masks(2, 20)
    for record in (top, compare("A", "B", "validation accuracy", correct_a=a, correct_b=b)):
        assert rerender(json.loads(json.dumps(record))) == record["words"]


def test_start_notebook_without_student_json_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        start_notebook("full")
    message = str(info.value)
    assert "student.json" in message and str(tmp_path) in message and "create it" in message
    assert "\n" not in message
    assert not (tmp_path / "results").exists()  # refused before anything is written


def documented(x):
    """A docstring
    on two lines."""
    # a comment that stays
    return x + 1


def test_source_leaves_out_the_docstring_and_nothing_else():
    from report import source

    assert source(documented) == "def documented(x):\n    # a comment that stays\n    return x + 1\n"
    assert source(source).startswith("def source(obj):\n    import ast")


def test_training_table_shows_each_record_from_its_history():
    from report import training_line, training_record, training_table

    history = {"accuracy": [0.25, 0.5, 0.75], "val_accuracy": [0.2, 0.4, 0.35]}
    stopped = training_record("A", history, 3, 2, 150, "2026-11-29T12:05:29+00:00", epochs=40)
    every = training_record("B", history, 3, None, 30, None)
    table = training_table([stopped, every], title="run").splitlines()
    assert table[0] == "| run | epochs | kept | min | last epoch: train / valid | on |"
    assert table[2] == "| A | 3 of 40 | 2 | 2.5 | 0.750 / 0.350 | 2026-11-29 |"
    assert table[3] == "| B | 3 | 3 | 0.5 | 0.750 / 0.350 | unknown |"  # kept: the last epoch
    assert training_line(stopped) == (
        "*Trained:* A, 3 of 40 epochs, kept epoch 2, 2.5 min; "
        "last epoch: training accuracy 0.750, validation 0.350; on 2026-11-29."
    )
    with pytest.raises(ValueError, match="C: the history has no per-epoch accuracy"):
        training_record("C", {"loss": [1.0]}, 1, 1, 1.0, None)


@pytest.mark.parametrize(
    "a, b", [(0.62, 0.638), (0.8885, 0.88861), (0.1087, 0.2113), (0.5, 0.49999), (0.774, 0.762)]
)
def test_the_words_figures_add_up_as_shown(a, b):
    import re

    from report import _comparison

    words = _comparison("A", "B", "test accuracy", a, b, "McNemar", 0.5, "", 0.05)["words"]
    shown_a, shown_b, shown_difference = re.match(
        r"[^,]*, ([\d.]+) → ([\d.]+) \(([-+][\d.]+),", words
    ).groups()
    digits = len(shown_difference.split(".")[1])
    assert f"{float(shown_b) - float(shown_a):+.{digits}f}" == shown_difference
    assert (
        digits == 3 or f"{round(b, 3) - round(a, 3):+.3f}" != f"{b - a:+.3f}"
    )  # more digits only where needed
