"""The warm-start probe: factor accuracy and call agreement against hand-computed values, and one
probe of a very small model end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks.warmstart import (
    KINDS,
    answer_follows_call,
    call_agreement,
    factor_accuracy,
    factor_kind,
    reference_factors,
    stated_call,
    stated_factors,
)
from workers.clinical import task

# ECOG 1, stage IV, line 2, carboplatin (neutral: left out), prior PD, LDH normal (left out),
# albumin normal (left out), brain metastases.
CASE_A = task.Case(age=59, sex="woman", ecog=1, stage="IV", histology="squamous",
                   biomarker="PD-L1 high", line=2, regimen="carboplatin-pemetrexed",
                   prior_response="PD", ldh=235, albumin=4.4, hemoglobin=14.5, brain_mets=True)
# ECOG 0, stage II, line 1, osimertinib for EGFR (+1.6), no prior, LDH high, albumin low, no mets.
CASE_B = task.Case(age=50, sex="man", ecog=0, stage="II", histology="adenocarcinoma",
                   biomarker="EGFR", line=1, regimen="osimertinib", prior_response="none",
                   ldh=300, albumin=3.2, hemoglobin=13.0, brain_mets=False)


def test_the_reference_states_the_non_neutral_factors_by_kind() -> None:
    assert reference_factors(CASE_A) == {
        "ECOG": "ECOG 1 +", "stage": "stage IV -", "line": "line 2 -", "prior": "prior PD -",
        "brain mets": "brain mets -"}
    assert reference_factors(CASE_B) == {
        "ECOG": "ECOG 0 +", "stage": "stage II +", "line": "line 1 +",
        "regimen": "osimertinib for EGFR +", "LDH": "LDH high -", "albumin": "albumin low -"}
    assert factor_kind("no brain mets -") == "brain mets" and factor_kind("Hb low -") == "other"


def test_stated_factors_and_call_are_read_from_the_answer_lines() -> None:
    text = "Factors: ECOG 2 -; stage IV -; brain mets -.\nOverall: unfavorable.\nANSWER: NO"
    assert stated_factors(text) == ["ECOG 2 -", "stage IV -", "brain mets -"]
    assert stated_call(text) is False
    assert stated_call("Overall: favorable.") is True
    assert stated_factors("ANSWER: YES") == [] and stated_call("ANSWER: YES") is None


def test_factor_accuracy_counts_a_left_out_neutral_factor_as_read_and_compares_with_guessing() -> None:
    answers = [
        # A: ECOG wrong, stage right, line right, prior missing, brain mets right; states LDH high
        # where A's LDH is normal (left out in the reference): LDH wrong.
        "Factors: ECOG 2 -; stage IV -; line 2 -; LDH high -; brain mets -.\nOverall: unfavorable.",
        # B: everything right, the overall call too (B's logit is positive).
        "Factors: ECOG 0 +; stage II +; line 1 +; osimertinib for EGFR +; LDH high -; "
        "albumin low -.\nOverall: favorable.",
    ]
    acc = factor_accuracy([CASE_A, CASE_B], answers)
    assert set(acc) == set(KINDS)
    assert acc["ECOG"] == {"n": 2, "accuracy": 0.5, "guess": 0.5}
    assert acc["stage"]["accuracy"] == 1.0 and acc["line"]["accuracy"] == 1.0
    assert acc["prior"]["accuracy"] == 0.5  # A's "prior PD -" missing; B's (none) rightly absent
    assert acc["LDH"]["accuracy"] == 0.5 and acc["albumin"]["accuracy"] == 1.0
    assert acc["regimen"]["accuracy"] == 1.0 and acc["brain mets"]["accuracy"] == 1.0
    assert task.true_logit(CASE_A) < 0 < task.true_logit(CASE_B)
    assert call_agreement([CASE_A, CASE_B], answers) == {"n_calls": 2, "agreement": 1.0}
    flipped = [answers[0].replace("unfavorable", "favorable"), "ANSWER: YES"]
    assert call_agreement([CASE_A, CASE_B], flipped) == {"n_calls": 1, "agreement": 0.0}


def test_answer_follows_call_compares_the_answer_line_with_the_answers_own_call() -> None:
    texts = [
        "Factors: ECOG 1 +.\nOverall: favorable.\nANSWER: YES",    # follows; call right
        "Factors: ECOG 1 +.\nOverall: favorable.\nANSWER: NO",     # does not; call wrong
        "Factors: ECOG 2 -.\nOverall: unfavorable.\nANSWER: NO",   # follows; call right
        "Factors: ECOG 2 -.\nOverall: unfavorable.\nANSWER: maybe",  # no answer; call right
        "Factors: ECOG 0 +.\nANSWER: YES",                           # no call
    ]
    outcomes = [True, False, False, False, True]
    # Both a call and an answer: 3, of which 2 follow. Calls: 4, right against the outcome: 3.
    assert answer_follows_call(texts, outcomes) == {
        "n_both": 3, "follows": 2 / 3, "n_calls": 4, "call_correct": 3 / 4}
    assert answer_follows_call(["ANSWER: YES"], [True]) == {
        "n_both": 0, "follows": None, "n_calls": 0, "call_correct": None}


def test_the_probe_writes_one_entry_per_recipe_and_a_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import warmstart

    argv = ["warmstart", "--size", "test", "--demos", "300", "--sft-steps", "20", "--lr", "1e-2",
            "--batch-size", "8", "--prompts", "6", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    warmstart.main()
    monkeypatch.setattr(sys, "argv", [*argv[:6], "21", *argv[7:]])
    warmstart.main()
    saved = json.loads((tmp_path / "warmstart.json").read_text())
    assert sorted(r["recipe"]["sft_steps"] for r in saved["recipes"].values()) == [20, 21]
    run = next(iter(saved["recipes"].values()))
    for mode in ("greedy", "t1"):
        assert set(run[mode]["factors"]) == set(KINDS)
        assert all(0.0 <= f["accuracy"] <= 1.0 and f["n"] == 6 for f in run[mode]["factors"].values())
        assert 0.0 <= run[mode]["parse_rate"] <= 1.0
    assert (tmp_path / "warmstart.png").stat().st_size > 0


def test_after_round_probes_the_warm_start_and_one_round_of_each_algorithm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import warmstart

    # A small tuned point: the shipped one takes 8 epochs of 16 groups a step.
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"best": {
        "oapl": {"lr": 1e-3, "beta2": 0.1, "epochs": 1, "keep_zero_variance_groups": True},
        "grpo": {"lr": 1e-3, "epochs": 1, "keep_zero_variance_groups": True}}}))
    recipe = ["--size", "test", "--demos", "300", "--sft-steps", "20", "--lr", "1e-2",
              "--batch-size", "8", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["warmstart", *recipe, "--prompts", "6"])
    warmstart.main()
    monkeypatch.setattr(sys, "argv", [
        "warmstart", *recipe, "--prompts", "5", "--after-round", "--round-prompts", "4",
        "--group-size", "3", "--samples", "2", "--tuned", str(tuned)])
    warmstart.main()
    saved = json.loads((tmp_path / "warmstart.json").read_text())
    assert len(saved["recipes"]) == 1  # the recipe probe's entry is kept beside the new one
    (entry,) = saved["after_round"].values()
    assert (entry["round_prompts"], entry["group_size"], entry["prompts"]) == (4, 3, 5)
    assert entry["tuned"]["oapl"]["epochs"] == 1
    assert sorted(entry["models"]) == ["grpo", "oapl", "warm-start"]
    for name, model in entry["models"].items():
        assert model["greedy"]["samples"] == 1 and model["t1"]["samples"] == 2
        for mode in ("greedy", "t1"):
            follows = model[mode]["answer_follows_call"]
            # Every answer with a call is counted, 5 prompts × samples at most.
            assert 0 <= follows["n_both"] <= follows["n_calls"] <= 5 * model[mode]["samples"]
            assert all(f["n"] == 5 * model[mode]["samples"]
                       for f in model[mode]["factors"].values())
        if name != "warm-start":
            # 4 groups at 16 a step, one epoch: one optimizer step.
            assert model["optimizer_steps"] == 1
    assert 0.0 <= entry["majority_rate"] <= 1.0
    assert (tmp_path / "warmstart_after_round.png").stat().st_size > 0
