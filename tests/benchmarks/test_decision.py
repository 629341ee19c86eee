"""The decision probe: the Bayes side and its agreement against hand-computed values, the oracle
reward, and one very small lagged run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.decision import (
    DecisionConfig,
    bayes_side,
    decision_summary,
    plot,
    prompt_items,
    run_probe,
)
from workers.clinical import task

TINY = (("n_demos", 600), ("sft_steps", 80), ("batch_size", 16), ("lr", 1e-2))


def test_bayes_agreement_counts_parsed_answers_on_the_bayes_side_with_prompts_as_clusters() -> None:
    # prompt 1: outcome YES, Bayes side NO; prompt 2: outcome NO, Bayes side NO
    parsed = [[True, False, None, False], [False, True, None, None]]
    s = decision_summary(parsed, [True, False], [False, False])
    assert s["correct"] == pytest.approx((1 / 4 + 1 / 4) / 2)
    assert s["parse_rate"] == pytest.approx((3 / 4 + 2 / 4) / 2)
    assert s["parsed_accuracy"] == pytest.approx(2 / 5)  # YES of prompt 1, NO of prompt 2
    assert s["bayes_agreement"] == pytest.approx(3 / 5)  # the three NOs
    low, high = s["bayes_agreement_ci95"]
    # whole prompts resampled: the interval spans prompt 1's 2/3 and prompt 2's 1/2 at most
    assert 0.5 - 1e-9 <= low <= 3 / 5 <= high <= 2 / 3 + 1e-9
    none = decision_summary([[None, None]], [True], [True])
    assert none["bayes_agreement"] is None and none["bayes_agreement_ci95"] is None


def test_the_bayes_reward_grades_against_the_sign_of_the_hidden_logit() -> None:
    examples = task.generate(1000, 40, "train")
    drawn = prompt_items(1000, 40, "train", "outcome")
    oracle = prompt_items(1000, 40, "train", "bayes")
    assert [p.messages for p in drawn] == [p.messages for p in oracle]
    assert [p.outcome["value"] for p in drawn if p.outcome] == [e.outcome for e in examples]
    sides = [task.true_logit(e.case) > 0 for e in examples]
    assert [p.outcome["value"] for p in oracle if p.outcome] == sides
    assert [bayes_side(e.case) for e in examples] == sides
    # the drawn outcome leaves the Bayes side on some of 40 cases (the rule is right ~77%)
    assert any(e.outcome != s for e, s in zip(examples, sides, strict=True))


def test_a_bad_probe_config_is_refused_before_anything_is_built() -> None:
    with pytest.raises(ValueError, match="reward"):
        DecisionConfig(reward="judge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 1"):
        DecisionConfig(groups_per_step=0)


@pytest.mark.timeout(300)
def test_a_lagged_run_is_evaluated_at_step_zero_and_every_eval_every(tmp_path: Path) -> None:
    dc = DecisionConfig(reward="bayes", steps=4, groups_per_step=2, group_size=2,
                        sync_interval=2, keep_zero_variance_groups=True, prompts=6, samples=2, eval_every=2, size="test",
                        bootstrap_overrides=TINY, cache_dir=str(tmp_path / "models"),
                        max_tokens=64)
    run = run_probe(dc, log=lambda line: None)
    # groups that all scored alike are kept: the tiny test model seldom parses
    assert run["status"] == "succeeded" and run["optimizer_steps"] == 4
    assert [h["step"] for h in run["history"]] == [0, 2, 4]
    for h in run["history"]:
        assert 0.0 <= h["correct"] <= h["parse_rate"] <= 1.0
        agreement = h["bayes_agreement"]
        assert agreement is None or 0.0 <= agreement <= 1.0
    assert 0.5 <= run["majority_rate"] <= 1.0 and 0.0 <= run["bayes_rate"] <= 1.0
    assert math.isfinite(run["seconds"])
    json.dumps(run)  # stored as is in decision.json
    plot({"smoke": run}, tmp_path / "decision.png")
    assert (tmp_path / "decision.png").stat().st_size > 0
