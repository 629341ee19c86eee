"""The reading probe: the stated call and the factor list read against hand-built answers, and one
very small recipe end to end."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from benchmarks.reading import (
    factor_recall,
    overall_call,
    plot,
    reading_summary,
    run_reading,
)
from workers.clinical import task
from workers.learner.bootstrap import BootstrapConfig


def test_the_stated_call_is_read_from_the_overall_line_only() -> None:
    assert overall_call("Factors: ECOG 0 +.\nOverall: favorable.\nANSWER: NO") is True
    assert overall_call("Factors: ECOG 3 -.\nOverall: unfavorable.\nANSWER: YES") is False
    assert overall_call("Factors: ECOG 3 -.\nANSWER: YES") is None
    assert overall_call("Overall: favourable.") is None  # not the template's word


def test_factor_recall_counts_the_templates_signed_factors_written_exactly() -> None:
    case = task.generate(3, 1, "validation")[0].case
    text, _ = task.reasoning(case, random.Random(0), call_noise=0.0)
    assert factor_recall(text, case) == 1.0
    head, rest = text.split("\n", 1)
    parts = head.removeprefix("Factors: ").removesuffix(".").split("; ")
    assert len(parts) >= 2
    flipped = parts[0][:-1] + ("-" if parts[0].endswith("+") else "+")
    wrong = "Factors: " + "; ".join([flipped, *parts[1:]]) + ".\n" + rest
    assert factor_recall(wrong, case) == pytest.approx((len(parts) - 1) / len(parts))
    # a factor written only after the first line (in the answer) does not count
    assert factor_recall("Factors: .\n" + head, case) == 0.0


def test_the_reading_summary_against_hand_computed_values() -> None:
    examples = task.generate(5, 2, "validation")
    cases = [e.case for e in examples]
    sides = [task.true_logit(c) > 0 for c in cases]
    word = {True: "favorable", False: "unfavorable"}
    texts = [
        # prompt 1: one call on the Bayes side, one against it, one unstated
        [f"Overall: {word[sides[0]]}.", f"Overall: {word[not sides[0]]}.", "ANSWER: YES"],
        # prompt 2: both calls on the Bayes side
        [f"Overall: {word[sides[1]]}.", f"Overall: {word[sides[1]]}."],
    ]
    outcomes = [sides[0], not sides[1]]
    s = reading_summary(texts, cases, outcomes)
    assert s["overall_stated"] == pytest.approx(4 / 5)
    assert s["overall_bayes_agreement"] == pytest.approx(3 / 4)
    assert s["overall_correct_if_stated"] == pytest.approx(1 / 4)  # prompt 1's Bayes-side call
    assert s["overall_favorable_share"] == pytest.approx(
        (sides[0] + (not sides[0]) + 2 * sides[1]) / 4)
    assert s["factor_recall"] == 0.0  # no factor lists at all
    low, high = s["overall_bayes_agreement_ci95"]
    assert 0.5 - 1e-9 <= low <= 3 / 4 <= high <= 1.0


@pytest.mark.timeout(300)
def test_a_small_recipe_is_built_and_read(tmp_path: Path) -> None:
    recipe = BootstrapConfig(size="test", n_demos=300, sft_steps=30, batch_size=8, lr=1e-2)
    out = run_reading(recipe, prompts=6, samples=2, cache_dir=str(tmp_path))
    assert out["prompts"] == 6 and out["recipe"]["sft_steps"] == 30
    assert out["build_seconds"] > 0
    for cond in ("greedy", "t1"):
        r = out[cond]
        assert 0.0 <= r["overall_stated"] <= 1.0 and 0.0 <= r["factor_recall"] <= 1.0
        assert 0.0 <= r["correct"] <= r["parse_rate"] <= 1.0


def test_the_plot_draws_every_recipe_even_one_that_stated_no_call(tmp_path: Path) -> None:
    point = {"overall_bayes_agreement": 0.8, "overall_bayes_agreement_ci95": [0.75, 0.85]}
    none = {"overall_bayes_agreement": None, "overall_bayes_agreement_ci95": None}
    plot({"a": {"greedy": point, "t1": point}, "b": {"greedy": point, "t1": none}},
         tmp_path / "reading.png")
    assert (tmp_path / "reading.png").stat().st_size > 1000
