"""The learner benchmark's RSS floor: its analytic activation bytes against what autograd saves."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from benchmarks.learner import activation_bytes, shared_activation_bytes
from tests.support.learner import prompt_items, reached_overall
from workers.inference.base import SamplingParams
from workers.inference.local import LocalBackend
from workers.learner import bundled
from workers.learner.data import (
    Batch,
    TrainingGroup,
    flatten_groups,
    make_rollout_groups,
    micro_batches,
)
from workers.learner.trainer import TrainerConfig, load_policy, sequence_logprobs


def _saved_bytes(policy: torch.nn.Module, mb: Batch) -> int:
    """Bytes of the distinct storages autograd saves for backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    saved: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        storage = x.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        sequence_logprobs(policy, mb)
    return sum(saved.values())


@pytest.fixture(scope="module")
def shipped_groups() -> tuple[LocalBackend, list[TrainingGroup]]:
    # The shipped model: the architecture (heads to key-value heads) the formulas were fitted to
    # and the benchmark measures; sampling its groups takes a second.
    backend = LocalBackend(bundled.SHIPPED_DIR)
    groups = make_rollout_groups(backend, prompt_items(3, 8), 6,
                                 SamplingParams(max_tokens=48, temperature=1.0, seed=3),
                                 reached_overall)
    return backend, groups


@pytest.mark.parametrize("rows", [20, 48])
def test_the_formulas_match_what_autograd_saves_in_either_layout(
    shipped_groups: tuple[LocalBackend, list[TrainingGroup]], rows: int,
) -> None:
    backend, groups = shipped_groups
    cfg = TrainerConfig()
    policy = load_policy(bundled.SHIPPED_DIR, cfg, None)
    mc = AutoConfig.from_pretrained(str(bundled.SHIPPED_DIR))
    m, r = len(cfg.target_modules), cfg.lora_rank
    records = flatten_groups(groups, backend.tokenizer, "oapl")[:rows]
    pad = backend.tokenizer.pad_token_id
    (shared,) = micro_batches(records, rows, pad)  # whole groups: each prompt runs once
    assert len(shared.prompts) < len(shared)
    measured = _saved_bytes(policy, shared)
    formula = shared_activation_bytes(mc, int(shared.prompts.shape[0]),
                                      int(shared.prompts.shape[1]), len(shared),
                                      int(shared.completions.shape[1]), r, m)
    # the formula leaves out the rotary tables and the final norm: a little under, never over
    shapes = (tuple(shared.prompts.shape), tuple(shared.completions.shape))
    assert 0.97 * measured <= formula <= measured, shapes
    one_pass = activation_bytes(mc, len(shared), int(shared.input_ids.shape[1]), r, m)
    assert one_pass > 1.5 * formula  # what running each prompt once saves here
    # rows of different prompts (and lengths: padded) take the one-pass layout
    firsts = list({rec.group_index: rec for rec in reversed(records)}.values())
    (apart,) = micro_batches(firsts, len(firsts), pad)
    assert len(apart.prompts) == len(apart) > 1
    measured = _saved_bytes(policy, apart)
    formula = activation_bytes(mc, len(apart), int(apart.input_ids.shape[1]), r, m)
    assert 0.97 * measured <= formula <= measured
