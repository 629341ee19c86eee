"""Bootstrap CI and pass@k against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from workers.evaluation.metrics import bootstrap_ci, pass_at_k


def test_pass_at_k_hand_values() -> None:
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # 1 − C(2,2)/C(4,2) = 1 − 1/6
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    # n − c < k: some draw of k must contain a correct one
    assert pass_at_k(5, 4, 2) == 1.0
    assert pass_at_k(5, 5, 5) == 1.0


def test_pass_at_k_matches_binomial_formula() -> None:
    for n, c, k in [(20, 7, 5), (50, 1, 10), (16, 8, 16)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_bootstrap_ci_is_seeded_and_brackets_the_mean() -> None:
    values = np.r_[np.ones(30), np.zeros(70)]
    lo, hi = bootstrap_ci(values, n_resamples=4000, alpha=0.05, seed=1)
    assert (lo, hi) == bootstrap_ci(values, n_resamples=4000, alpha=0.05, seed=1)
    assert lo < 0.3 < hi
    # normal approximation: 0.3 ± 1.96·sqrt(0.21/100) = 0.3 ± 0.0898
    assert lo == pytest.approx(0.21, abs=0.02)
    assert hi == pytest.approx(0.39, abs=0.02)


def test_bootstrap_ci_degenerate_inputs() -> None:
    assert bootstrap_ci([0.5]) == (0.5, 0.5)
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    assert bootstrap_ci([0.0, 1.0], n_boot=10, seed=0) == bootstrap_ci([0.0, 1.0], 10, 0.05, 0)
    with pytest.raises(ValueError):
        bootstrap_ci([1.0], alpha=1.5)
