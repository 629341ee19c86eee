"""Paired comparisons of two snapshots on the same prompts.

Both tests use the pairing: the candidate and the champion answered the same prompts with the same
seeds, so per-prompt differences cancel the prompt-to-prompt variance that an unpaired test would
have to overcome.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairedResult:
    diff: float
    """Mean of candidate − champion over prompts."""
    ci_low: float
    ci_high: float
    p_value: float
    """Two-sided bootstrap p-value for "no difference"."""
    n: int


def paired_bootstrap(
    candidate: Sequence[float],
    champion: Sequence[float],
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> PairedResult:
    """Resample prompts with replacement; each resample's statistic is the mean paired difference.

    CI: the (α/2, 1−α/2) percentiles of the resampled means. p-value: twice the smaller share of
    resampled means on either side of zero (capped at 1), the usual percentile-bootstrap test.
    """
    a = np.asarray(candidate, dtype=np.float64)
    b = np.asarray(champion, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.shape} vs {b.shape}")
    n = int(a.size)
    if n == 0:
        return PairedResult(0.0, 0.0, 0.0, 1.0, 0)
    d = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    means = d[idx].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    if np.all(d == 0):
        p = 1.0
    else:
        p = min(1.0, 2.0 * min(float(np.mean(means <= 0)), float(np.mean(means >= 0))))
    return PairedResult(float(d.mean()), float(low), float(high), p, n)


@dataclass(frozen=True)
class McNemarResult:
    candidate_only: int
    """Prompts the candidate got right and the champion wrong (b)."""
    champion_only: int
    """Prompts the champion got right and the candidate wrong (c)."""
    p_value: float
    """Exact two-sided binomial test of b against Binomial(b + c, 1/2)."""


def mcnemar_exact(candidate: Sequence[bool], champion: Sequence[bool]) -> McNemarResult:
    """McNemar's test on paired binary outcomes; only the discordant pairs carry information."""
    if len(candidate) != len(champion):
        raise ValueError("paired samples differ in length")
    b = sum(1 for x, y in zip(candidate, champion, strict=True) if x and not y)
    c = sum(1 for x, y in zip(candidate, champion, strict=True) if y and not x)
    m = b + c
    if m == 0:
        return McNemarResult(b, c, 1.0)
    tail = sum(math.comb(m, i) for i in range(min(b, c) + 1)) / 2**m
    return McNemarResult(b, c, min(1.0, 2.0 * tail))
