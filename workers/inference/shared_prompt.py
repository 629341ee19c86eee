"""Each distinct prompt through the model once, its KV cache shared by every row that continues it.

A rollout group is G completions of one prompt, and on the bundled task the prompt is about three
quarters of a group's tokens: running it once per group instead of once per completion cuts the
sampler's prefill and the learner's forward and backward passes by about that share. The layout
is the sampler's: prompts left-padded so that each one's next token is in the last column,
positions counted from each prompt's first real token, completions appended after it. The
learner scores with the same layout, so at θ = θ_ref it reproduces the sampler's log-probs.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def cache_keyword(model: Any) -> str:
    """The KV-cache keyword of this transformers version: ``cache`` (5.x, where
    ``past_key_values`` is deprecated) or ``past_key_values`` (4.x)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft
    forward = inspect.signature(base.forward).parameters
    return "cache" if "cache" in forward else "past_key_values"


def cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def distinct_prompts(prompts: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[int]]:
    """(the distinct prompts in first-seen order, the position of each row's prompt in them)."""
    seen: dict[tuple[int, ...], int] = {}
    rows = [seen.setdefault(tuple(p), len(seen)) for p in prompts]
    return [list(p) for p in seen], rows


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(token ids (U, P), attention mask (U, P)), each prompt right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


@dataclass
class Prefill:
    """The state after the prompts: what the next forward pass continues from."""

    cache: Any
    last_logits: Tensor  # (rows, V): the distribution of each row's first new token
    attention_mask: Tensor  # (rows, P)
    next_position: Tensor  # (rows, 1): the position of each row's first new token

    def for_rows(self, rows: Tensor) -> Prefill:
        """The same state for rows that continue the prompts ``rows`` (one index per row; a
        prompt may be continued by several). The cache is reindexed in place and differentiably:
        the prompts' gradients collect every row's."""
        self.cache.reorder_cache(rows)
        return Prefill(self.cache, self.last_logits[rows], self.attention_mask[rows],
                       self.next_position[rows])


def prefill(model: Any, ids: Tensor, mask: Tensor) -> Prefill:
    """Run left-padded prompts (``left_padded``) through ``model`` with a KV cache."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    return Prefill(cache_of(out), out.logits[:, -1, :], mask, positions[:, -1:] + 1)


def continuation_logits(model: Any, state: Prefill, tokens: Tensor, mask: Tensor) -> Tensor:
    """Logits (rows, C, V) of the distribution of each of ``tokens`` (rows, C; right-padded,
    ``mask`` 1 on real tokens) given the prompt in ``state`` and the tokens before it."""
    positions = state.next_position + torch.arange(tokens.shape[1], device=tokens.device)
    out = model(
        input_ids=tokens,
        attention_mask=torch.cat([state.attention_mask, mask], dim=1),
        position_ids=positions,
        use_cache=True,
        **{cache_keyword(model): state.cache},
    )
    # position t's logits predict token t + 1; the first token's come from the prompt
    return torch.cat([state.last_logits.unsqueeze(1), out.logits[:, :-1, :]], dim=1)
