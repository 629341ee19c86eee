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
    "require_significant_gain": False,
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


# --- the default gate: relative to the champion, the gain must be significant ------------------


def paired(low, high):
    return {"correct": {"diff": (low + high) / 2, "ci_low": low, "ci_high": high, "p_value": 0.01}}


def test_default_gate_passes_a_significant_gain_without_any_absolute_floor():
    # The bundled model parses ~10%: an absolute parse floor of 0.5 could never pass.
    low_parse = {"correct": {"value": 0.10}, "parse_rate": {"value": 0.09}, "mean_reward": -0.8}
    better = {"correct": {"value": 0.20}, "parse_rate": {"value": 0.30}, "mean_reward": -0.5}
    d = decide({}, better, low_parse, n=40, paired=paired(0.04, 0.16))
    assert d.passed, d.reasons
    assert d.checks["primary_ci"] == [0.04, 0.16]


def test_default_gate_rejects_a_gain_whose_ci_includes_zero():
    # issue 17: +0.015 with CI −0.02…0.05 used to pass with min_abs_gain 0
    d = decide({}, cand(correct=0.515), CHAMPION, n=300, paired=paired(-0.02, 0.05))
    assert not d.passed
    assert d.reasons == ["correct gain +0.015 (0.500 → 0.515) is not significant: "
                         "paired 95% CI [-0.020, +0.050] includes 0"]


def test_default_gate_rejects_a_parse_rate_regression_beyond_the_tolerance():
    d = decide({}, cand(parse=0.80), CHAMPION, n=40, paired=paired(0.05, 0.15))
    assert d.reasons == ["parse_rate regressed by 0.100, more than the allowed 0.050"]


def test_default_gate_without_a_paired_comparison_cannot_pass():
    d = decide({}, cand(), CHAMPION, n=40)
    assert d.reasons == ["no paired comparison of correct to test the gain on"]


def test_every_threshold_is_a_row_with_its_value_and_verdict():
    d = decide({}, cand(parse=0.80), CHAMPION, n=40, paired=paired(0.05, 0.15))
    rows = {r["check"]: (r["threshold"], r["value"], r["verdict"]) for r in d.rows}
    assert rows == {
        "held-out prompts evaluated": ("≥ 20", "40", "pass"),
        "parse rate (absolute floor)": ("not set (opt-in)", "0.800", "off"),
        "correct gain over the champion is significant": (
            "paired 95% CI lower bound > 0", "+0.100, CI [+0.050, +0.150]", "pass"),
        "correct gain (absolute)": ("not set (opt-in)", "+0.100 (0.500 → 0.600)", "off"),
        "correct gain (relative)": ("not set (opt-in)", "+20.0%", "off"),
        "mean_reward change vs the champion": ("≥ -0.050", "+0.050", "pass"),
        "parse_rate change vs the champion": ("≥ -0.050", "-0.100", "fail"),
    }
    # One failed row per reason.
    assert sum(r["verdict"] == "fail" for r in d.rows) == len(d.reasons) == 1


def test_opt_in_thresholds_show_their_setting_when_set():
    d = decide(GATE, cand(parse=0.79), CHAMPION, n=19)
    rows = {r["check"]: (r["threshold"], r["verdict"]) for r in d.rows}
    assert rows["parse rate (absolute floor)"] == ("≥ 0.800", "fail")
    assert rows["held-out prompts evaluated"] == ("≥ 20", "fail")
    assert rows["correct gain (absolute)"] == ("≥ +0.020", "pass")
    assert rows["correct gain (relative)"] == ("≥ +5.0%", "pass")
    assert rows["correct gain over the champion is significant"] == ("not required", "off")
