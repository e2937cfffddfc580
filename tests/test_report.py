"""report.py: McNemar's test and the stopwatch the notebooks use."""

import math
import time

import numpy as np
import pytest

from report import Stopwatch, mcnemar, significance


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
    assert significance(test).startswith("not significant (McNemar p = 1")


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
