"""Evaluation statistics as pure numpy functions: percentile bootstrap CI and unbiased pass@k."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    n_resamples: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    *,
    n_boot: int | None = None,
) -> tuple[float, float]:
    """Percentile-bootstrap (1 − alpha) CI of the mean of ``values``: (low, high).

    Resamples ``values`` with replacement ``n_resamples`` times (``n_boot`` is an alias) with a
    seeded generator, so the same inputs always give the same interval. One value → (v, v);
    no values → (nan, nan).
    """
    if n_boot is not None:
        n_resamples = n_boot
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_resamples, x.size))
    means = x[idx].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return (float(low), float(high))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 − C(n−c, k) / C(n, k).

    Computed as 1 − Π_{i=n−c+1}^{n} (1 − k/i) to avoid huge binomials (Chen et al., 2021).
    """
    if not (0 <= c <= n) or k < 1 or k > n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
