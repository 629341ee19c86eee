"""The eval job's numbers on a scripted backend, where every expected value is countable by hand."""

from __future__ import annotations

import pytest

from app.snapshots.evaluation import (
    EvalItem,
    evaluate_pair,
    metadata_value,
    pass_ks,
    reward_histogram,
)
from workers.graders import ContractGrader
from workers.inference.base import AdapterRef, Completion, SamplingParams

CANDIDATE = AdapterRef("p-v1", "/adapters/p-v1")


class ScriptedBackend:
    """Answers from a table: (adapter name, prompt id) → the k completion texts."""

    def __init__(self, script: dict[tuple[str, str], list[str]]) -> None:
        self.script = script
        self.seeds: list[int | None] = []

    def generate(self, prompts, n, params, adapter=None):
        self.seeds.append(params.seed)
        name = adapter.name if adapter else "base"
        out = []
        for p in prompts:
            texts = self.script[(name, p[-1]["content"])]
            assert len(texts) == n
            out.append([Completion(text=t, token_ids=[1]) for t in texts])
        return out


def item(pid: str, truth: bool, biomarker: str) -> EvalItem:
    return EvalItem(pid, [{"role": "user", "content": pid}], {"pfs_gt_180d": truth},
                    {"case": {"biomarker": biomarker}})


YES, NO, BAD = "ANSWER: YES", "ANSWER: NO", "Answer: yes"
ITEMS = [item("a", True, "EGFR"), item("b", False, "EGFR"), item("c", True, "ALK"),
         item("d", False, "none")]
SCRIPT = {
    # candidate: a ✓✓, b ✓✗, c ✗✓(first wrong), d ✓ + unparseable
    ("p-v1", "a"): [YES, YES],
    ("p-v1", "b"): [NO, YES],
    ("p-v1", "c"): [NO, YES],
    ("p-v1", "d"): [NO, BAD],
    # champion (base): mostly breaks the contract
    ("base", "a"): [BAD, YES],
    ("base", "b"): [BAD, BAD],
    ("base", "c"): [NO, NO],
    ("base", "d"): [NO, NO],
}


@pytest.fixture
def report():
    backend = ScriptedBackend(SCRIPT)
    r = evaluate_pair(backend, ITEMS, CANDIDATE, None, ContractGrader(), k=2, group_size=2,
                      params=SamplingParams(max_tokens=8, seed=7), breakdown_key="case.biomarker",
                      n_boot=200)
    assert backend.seeds == [7, 7]  # both snapshots sampled with the same seed
    return r


def test_point_metrics_match_a_hand_count(report):
    c, b = report.candidate, report.champion
    # first samples: candidate a✓ b✓ c✗ d✓ → 3/4; champion a(unparseable) b(unp.) c✗ d✓ → 1/4
    assert c["correct"]["value"] == pytest.approx(0.75)
    assert b["correct"]["value"] == pytest.approx(0.25)
    # parse: candidate 7/8 samples; champion 5/8
    assert c["parse_rate"]["value"] == pytest.approx(7 / 8)
    assert b["parse_rate"]["value"] == pytest.approx(5 / 8)
    # rewards: candidate a(1,1) b(1,0) c(0,1) d(1,−1) → mean 4/8
    assert c["mean_reward"]["value"] == pytest.approx(0.5)


def test_pass_at_k_is_the_unbiased_estimator(report):
    # candidate correct counts per prompt (n=2): a 2, b 1, c 1, d 1 → pass@1 = (1+.5+.5+.5)/4
    assert report.candidate["pass@1"]["value"] == pytest.approx(0.625)
    # pass@2 with n=2: any correct → 1 for all four
    assert report.candidate["pass@2"]["value"] == pytest.approx(1.0)
    assert "pass@4" not in report.candidate  # k=4 needs at least 4 samples


def test_confidence_intervals_bracket_the_value(report):
    for metrics in (report.candidate, report.champion):
        for m in metrics.values():
            assert m["ci_low"] <= m["value"] <= m["ci_high"]


def test_paired_comparison_and_mcnemar(report):
    assert report.paired["correct"]["diff"] == pytest.approx(0.5)
    # discordant first samples: a and b candidate-only, none champion-only
    assert report.mcnemar["candidate_only"] == 2 and report.mcnemar["champion_only"] == 0
    assert report.mcnemar["p_value"] == pytest.approx(0.5)


def test_breakdown_by_a_nested_metadata_key(report):
    groups = report.breakdown["groups"]
    assert set(groups) == {"EGFR", "ALK", "none"}
    assert groups["EGFR"]["n"] == 2
    assert groups["EGFR"]["candidate"]["correct"] == pytest.approx(1.0)
    assert groups["EGFR"]["champion"]["correct"] == pytest.approx(0.0)


def test_examples_are_the_prompts_where_the_snapshots_disagree(report):
    ids = [e["prompt_id"] for e in report.examples]
    assert ids[:2] == ["a", "b"]  # correctness flips come first
    assert "c" not in ids  # both wrong and parseable: no disagreement


def test_reward_histograms_count_every_sample(report):
    assert report.reward_hist["candidate"] == [[-1.0, 1.0], [0.0, 2.0], [1.0, 5.0]]
    assert sum(c for _, c in report.reward_hist["champion"]) == 8


def test_helpers():
    assert pass_ks(8, 8) == [1, 4, 8]
    assert pass_ks(2, 8) == [1]
    assert metadata_value({"a": {"b": 3}}, "a.b") == "3"
    assert metadata_value({}, "a.b") == "(missing)"
    assert len(reward_histogram([i / 100 for i in range(100)], bins=10)) == 10
