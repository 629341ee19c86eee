"""Pure statistics of the quality benchmark: a cluster bootstrap and the format-vs-decision
summary of a set of answers. No model, no I/O: numbers in, numbers out."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np


def cluster_bootstrap_means(
    values: Sequence[float], clusters: Sequence[Hashable], n_resamples: int = 2000, seed: int = 0
) -> np.ndarray:
    """Bootstrap distribution of the pooled mean when observations come in clusters.

    Each resample draws as many clusters as there are, with replacement, and takes the mean of
    every observation of the drawn clusters (Σ sums / Σ counts). The same prompt scored under
    three seeds is one cluster: its three values move together, as they are not independent.
    """
    if len(values) != len(clusters):
        raise ValueError(f"{len(values)} values but {len(clusters)} cluster labels")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not values:
        return np.full(n_resamples, np.nan)
    index: dict[Hashable, int] = {}
    ids = np.array([index.setdefault(c, len(index)) for c in clusters])
    sums = np.bincount(ids, weights=np.asarray(values, dtype=np.float64))
    counts = np.bincount(ids).astype(np.float64)
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(index), size=(n_resamples, len(index)))
    return np.asarray(sums[draw].sum(axis=1) / counts[draw].sum(axis=1))


def cluster_bootstrap_ci(
    values: Sequence[float],
    clusters: Sequence[Hashable],
    n_resamples: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile (1 − alpha) interval of ``cluster_bootstrap_means``; (nan, nan) for no values."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    means = cluster_bootstrap_means(values, clusters, n_resamples, seed)
    if np.isnan(means).all():
        return (float("nan"), float("nan"))
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return (float(low), float(high))


def parsed_accuracy_ci95(
    answers: Sequence[Sequence[bool | None]], truths: Sequence[bool]
) -> list[float] | None:
    """95% interval of the accuracy among parsed answers against ``truths`` (one per prompt), by
    bootstrap over prompts: a prompt's k answers are one cluster. None when nothing parsed."""
    hits = [(float(a == y), i) for i, (ans, y) in enumerate(zip(answers, truths, strict=True))
            for a in ans if a is not None]
    if not hits:
        return None
    return list(cluster_bootstrap_ci([v for v, _ in hits], [i for _, i in hits], seed=0))


def answer_summary(answers: Sequence[Sequence[bool | None]], outcomes: Sequence[bool]) -> dict[str, Any]:
    """Format vs decision for k answers per prompt (True = YES, False = NO, None = unparseable).

    correct: mean over prompts of the share of the k answers equal to the outcome (unparseable =
    wrong); first_sample_correct: the same for the first answer only; parse_rate: share parsed;
    parsed_accuracy: correct among parsed answers; yes_share: YES among parsed answers (None when
    nothing parsed). Per-prompt lists come along for the cluster bootstrap.
    """
    if len(answers) != len(outcomes):
        raise ValueError(f"{len(answers)} answer lists but {len(outcomes)} outcomes")
    per_correct = [float(np.mean([a == y for a in ans])) for ans, y in zip(answers, outcomes, strict=True)]
    per_parse = [float(np.mean([a is not None for a in ans])) for ans in answers]
    first = [float(ans[0] == y) for ans, y in zip(answers, outcomes, strict=True)]
    parsed = [(a, y) for ans, y in zip(answers, outcomes, strict=True) for a in ans if a is not None]
    return {
        "correct": float(np.mean(per_correct)),
        "first_sample_correct": float(np.mean(first)),
        "parse_rate": float(np.mean(per_parse)),
        "parsed_accuracy": float(np.mean([a == y for a, y in parsed])) if parsed else None,
        "yes_share": float(np.mean([a for a, _ in parsed])) if parsed else None,
        "n_parsed": len(parsed),
        "n_parsed_correct": int(sum(a == y for a, y in parsed)),
        "n_yes": int(sum(a for a, _ in parsed)),
        "per_prompt_correct": per_correct,
        "per_prompt_first": first,
        "per_prompt_parse": per_parse,
    }


def majority_rate(outcomes: Sequence[bool]) -> float:
    """Accuracy of always answering the more frequent outcome of this set."""
    p = float(np.mean(outcomes))
    return max(p, 1.0 - p)
