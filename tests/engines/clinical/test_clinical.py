"""Synthetic clinical task: determinism, splits, ingest shape, documented noise level."""

from __future__ import annotations

import random

from workers.clinical import task
from workers.graders import parse_answer


def test_same_seed_same_examples_and_items() -> None:
    assert task.generate(3, 50) == task.generate(3, 50)
    assert task.ingest_items(3, 20) == task.ingest_items(3, 20)


def test_different_seed_or_split_gives_different_examples() -> None:
    a = task.generate(3, 50, "train")
    assert a != task.generate(4, 50, "train")
    held = task.generate(3, 50, "heldout")
    assert {e.case for e in a}.isdisjoint({e.case for e in held})
    assert all(e.external_id.startswith("clin-heldout-") for e in held)


def test_ingest_item_has_the_api_shape() -> None:
    item = task.ingest_items(0, 1, policy="p")[0]
    assert set(item) == {"external_id", "policy", "messages", "response", "metadata", "outcome"}
    assert item["policy"] == "p"
    assert [m["role"] for m in item["messages"]] == ["system", "user"]
    assert item["outcome"]["name"] == "pfs_gt_180d"
    assert isinstance(item["outcome"]["value"], bool)


def test_outcomes_follow_the_hidden_model_and_bayes_bound_is_well_below_one() -> None:
    examples = task.generate(0, 4000)
    base_rate = sum(e.outcome for e in examples) / len(examples)
    assert 0.4 < base_rate < 0.6
    bayes = task.bayes_optimal_accuracy(n=20_000)
    assert 0.70 < bayes < 0.82
    # the Bayes rule (sign of the logit) achieves about the bound on sampled outcomes
    acc = sum((task.true_logit(e.case) > 0) == e.outcome for e in examples) / len(examples)
    assert abs(acc - bayes) < 0.03


def test_weak_model_rarely_follows_the_contract() -> None:
    rng = random.Random(0)
    examples = task.generate(1, 2000)
    parsed = [parse_answer(task.weak_response(e.case, rng)) for e in examples]
    parse_rate = sum(p is not None for p in parsed) / len(parsed)
    assert 0.08 < parse_rate < 0.2
