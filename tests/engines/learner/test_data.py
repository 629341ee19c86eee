"""Training groups on disk: the sampling temperature travels with the group."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workers.learner.data import GradedCompletion, TrainingGroup, load_groups_jsonl


def _line(**extra: object) -> str:
    completion = {"token_ids": [5, 6], "text": "a", "behaviour_logprob_sum": -1.5,
                  "reward": 1.0, "parse_ok": True}
    return json.dumps({"group_id": "g", "prompt_messages": [{"role": "user", "content": "q"}],
                       "completions": [completion], **extra}) + "\n"


def test_a_group_without_temperature_was_sampled_at_one(tmp_path: Path) -> None:
    (tmp_path / "g.jsonl").write_text(_line() + _line(temperature=0.7))
    old, new = load_groups_jsonl(tmp_path / "g.jsonl")
    assert old.temperature == 1.0
    assert new.temperature == 0.7
    assert new.completions == [GradedCompletion([5, 6], "a", -1.5, 1.0, True)]


def test_a_negative_temperature_is_refused_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "g.jsonl").write_text(_line() + _line(temperature=-1.0))
    with pytest.raises(ValueError, match=r"g\.jsonl:2.*temperature"):
        load_groups_jsonl(tmp_path / "g.jsonl")
    with pytest.raises(ValueError, match="temperature"):
        TrainingGroup("g", [], [], temperature=float("nan"))
