"""The gate's decisions, with hand-picked numbers at each threshold."""

from __future__ import annotations

import math

import pytest

from app.snapshots.gate import decide, relative_gain

GATE = {
    "primary_metric": "correct",
    "min_abs_gain": 0.02,
    "min_rel_gain": 0.05,
    "min_parse_rate": 0.8,
    "max_secondary_regression": 0.05,
    "min_eval_n": 20,
}
CHAMPION = {"correct": {"value": 0.50}, "parse_rate": {"value": 0.90}, "mean_reward": 0.20}


def cand(correct=0.60, parse=0.95, reward=0.25):
    return {"correct": {"value": correct}, "parse_rate": {"value": parse}, "mean_reward": reward}


def test_a_clear_improvement_passes():
    d = decide(GATE, cand(), CHAMPION, n=40)
    assert d.passed and d.reasons == []
    assert d.checks["abs_gain"] == pytest.approx(0.10)
    assert d.checks["rel_gain"] == pytest.approx(0.20)


@pytest.mark.parametrize(
    ("candidate", "n", "fragment"),
    [
        (cand(), 19, "eval n 19 is below the minimum 20"),
        (cand(parse=0.79), 40, "parse rate 0.790 is below the minimum 0.800"),
        (cand(correct=0.51), 40, "correct gain +0.010"),
        (cand(reward=0.14), 40, "mean_reward regressed by 0.060"),
    ],
)
def test_each_threshold_rejects_with_its_reason(candidate, n, fragment):
    d = decide(GATE, candidate, CHAMPION, n=n)
    assert not d.passed
    assert any(fragment in r for r in d.reasons), d.reasons


def test_relative_gain_threshold_applies_on_its_own():
    # +0.02 absolute is enough, but 0.02/0.5 = 4% relative is not.
    d = decide(GATE, cand(correct=0.52), CHAMPION, n=40)
    assert [r for r in d.reasons if "relative" in r] and len(d.reasons) == 1


def test_secondary_regression_exactly_at_the_limit_passes():
    d = decide(GATE, cand(parse=0.85), CHAMPION, n=40)
    assert d.passed, d.reasons


def test_primary_metric_is_configurable():
    gate = GATE | {"primary_metric": "mean_reward", "min_rel_gain": 0.0}
    d = decide(gate, cand(correct=0.49, reward=0.30), CHAMPION, n=40)
    assert d.passed, d.reasons


def test_gain_from_zero_is_an_infinite_relative_gain():
    assert relative_gain(0.1, 0.0) == math.inf
    assert relative_gain(0.0, 0.0) == 0.0
    d = decide(GATE, cand(correct=0.1), {**CHAMPION, "correct": 0.0}, n=40)
    assert d.checks["rel_gain"] is None  # JSON has no infinity


def test_all_failures_are_reported_together():
    d = decide(GATE, cand(correct=0.4, parse=0.1, reward=-1.0), CHAMPION, n=3)
    assert len(d.reasons) == 6
