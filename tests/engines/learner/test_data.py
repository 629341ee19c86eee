"""Training groups on disk (the sampling temperature travels with the group) and the batches
the trainer makes of them."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from workers.learner.data import (
    Batch,
    GradedCompletion,
    SequenceRecord,
    TrainingGroup,
    load_groups_jsonl,
    micro_batches,
)


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


def test_a_micro_batch_moves_to_the_trainer_device_whole() -> None:
    records = [SequenceRecord(0, [1, 2], [3, 4, 5], [-0.5, -0.25, -1.0], -1.75, 1.0, 0.5, 0.7),
               SequenceRecord(0, [1], [3], None, -2.0, -1.0, -0.5, 0.7)]
    (batch,) = micro_batches(records, 2, pad_id=0)
    assert batch.to(torch.device("cpu")) is batch  # already there: no copy
    moved = batch.to(torch.device("meta"))  # a device every machine has
    for f in fields(Batch):
        before, after = getattr(batch, f.name), getattr(moved, f.name)
        assert after.device.type == "meta", f.name
        assert (after.shape, after.dtype) == (before.shape, before.dtype), f.name
