"""Paired tests with hand-computed expectations."""

from __future__ import annotations

import pytest

from workers.evaluation.paired import mcnemar_exact, paired_bootstrap


def test_mcnemar_counts_only_discordant_pairs():
    cand = [True, True, True, False, True, False]
    champ = [False, False, True, False, True, True]
    r = mcnemar_exact(cand, champ)
    assert (r.candidate_only, r.champion_only) == (2, 1)
    # Binomial(3, 1/2): P(X <= 1) = 4/8; two-sided = 1.0
    assert r.p_value == pytest.approx(1.0)


def test_mcnemar_exact_p_value_for_a_lopsided_split():
    # b = 9, c = 1: P(X <= 1 | n=10) = 11/1024, two-sided 22/1024.
    cand = [True] * 9 + [False] + [True] * 5
    champ = [False] * 9 + [True] + [True] * 5
    r = mcnemar_exact(cand, champ)
    assert r.p_value == pytest.approx(22 / 1024)


def test_mcnemar_with_no_discordant_pairs_is_one():
    assert mcnemar_exact([True, False], [True, False]).p_value == 1.0


def test_paired_bootstrap_of_a_constant_difference_has_a_point_interval():
    r = paired_bootstrap([1.0, 2.0, 3.0], [0.5, 1.5, 2.5], n_boot=200)
    assert (r.diff, r.ci_low, r.ci_high) == pytest.approx((0.5, 0.5, 0.5))
    assert r.p_value == 0.0


def test_paired_bootstrap_of_identical_samples_is_not_significant():
    r = paired_bootstrap([0.2, 0.9, 0.4], [0.2, 0.9, 0.4])
    assert r.diff == 0.0 and r.p_value == 1.0


def test_paired_bootstrap_interval_brackets_the_mean_difference():
    cand = [1, 1, 0, 1, 1, 0, 1, 1, 1, 0] * 4
    champ = [1, 0, 0, 1, 0, 0, 1, 0, 1, 0] * 4
    r = paired_bootstrap(cand, champ, n_boot=2000, seed=1)
    assert r.diff == pytest.approx(0.3)
    assert 0.1 < r.ci_low < 0.3 < r.ci_high < 0.5
    assert r.p_value < 0.01


def test_paired_bootstrap_refuses_unpaired_lengths():
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 2.0])
