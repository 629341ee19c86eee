"""Training groups → padded training batches.

``TrainingGroup`` / ``GradedCompletion`` are plain dataclasses so the DB-backed pipeline can build
them from rows (Rollout: token ids, text, behaviour log-prob sum, reward, parse_ok). Advantages are
computed here, per group, from rewards alone; after that every sequence is independent, so batches
can be cut anywhere (micro-batches, data-parallel ranks) without changing the loss.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from workers.inference.base import AdapterRef, InferenceBackend, SamplingParams
from workers.inference.chat import encode_prompt
from workers.inference.shared_prompt import distinct_prompts, left_padded
from workers.learner.losses import grpo_advantages, oapl_advantages


@dataclass
class GradedCompletion:
    token_ids: list[int]
    """Completion token ids as sampled (stop token included when it was sampled)."""
    text: str
    behaviour_logprob_sum: float
    """Σ of the sampler's per-token log-probs: log π_ref(y|x) for OAPL."""
    reward: float
    parse_ok: bool
    behaviour_logprobs: list[float] | None = None
    """Per-token behaviour log-probs; GRPO's token-level ratio uses them when present."""


@dataclass
class TrainingGroup:
    """The G graded completions of one prompt, as the learner sees them (the DB's rollout group,
    ``app.models.RolloutGroup``, is built into one of these by the training service)."""

    group_id: str
    prompt_messages: list[dict[str, str]]
    completions: list[GradedCompletion]
    reference: str | None = None
    """Name of the snapshot that generated the group (the lagged reference policy)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    """Sampling temperature T of the completions: the behaviour log-probs are those of
    softmax(logits / T), so the trainer scores πθ and π_ref at the same T. 0 (greedy) means the
    sampler reported log-probs at T = 1 (``SamplingParams``), and the trainer scores at 1 too."""

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")

    @property
    def rewards(self) -> list[float]:
        return [c.reward for c in self.completions]


@dataclass(frozen=True)
class PromptItem:
    """A prompt with the outcome its grader needs (e.g. a train trace and its late outcome)."""

    prompt_id: str
    messages: list[dict[str, str]]
    outcome: dict[str, Any] | None


def filter_zero_variance(
    groups: Iterable[TrainingGroup], eps: float = 1e-9
) -> tuple[list[TrainingGroup], int]:
    """Drop groups whose rewards are all equal (no learning signal); return (kept, n_dropped)."""
    kept, dropped = [], 0
    for g in groups:
        r = g.rewards
        if len(r) == 0 or max(r) - min(r) <= eps:
            dropped += 1
        else:
            kept.append(g)
    return kept, dropped


@dataclass(frozen=True)
class SequenceRecord:
    group_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    behaviour_logprobs: list[float] | None
    behaviour_logprob_sum: float
    reward: float
    advantage: float
    temperature: float
    """Scoring temperature: log-probs are taken from softmax(logits / temperature)."""


def scoring_temperature(group: TrainingGroup) -> float:
    """The T at which the group's behaviour log-probs were reported: its sampling temperature,
    or 1 for greedy groups (T = 0), whose sampler reports log-probs at temperature 1."""
    return group.temperature if group.temperature > 0 else 1.0


def flatten_groups(
    groups: Sequence[TrainingGroup], tokenizer: Any, algorithm: str, beta1: float = 1.0
) -> list[SequenceRecord]:
    """One record per completion with its group advantage (OAPL: r − V̂; GRPO: normalised)."""
    records = []
    for gi, g in enumerate(groups):
        prompt_ids = encode_prompt(tokenizer, g.prompt_messages)
        temperature = scoring_temperature(g)
        rewards = torch.tensor(g.rewards, dtype=torch.float64)
        if algorithm == "oapl":
            adv = oapl_advantages(rewards, beta1)
        elif algorithm == "grpo":
            adv = grpo_advantages(rewards)
        else:
            raise ValueError(f"unknown algorithm {algorithm!r}")
        for c, a in zip(g.completions, adv.tolist(), strict=True):
            if not c.token_ids:
                continue
            records.append(
                SequenceRecord(
                    gi,
                    prompt_ids,
                    list(c.token_ids),
                    list(c.behaviour_logprobs) if c.behaviour_logprobs is not None else None,
                    float(c.behaviour_logprob_sum),
                    float(c.reward),
                    float(a),
                    temperature,
                )
            )
    return records


@dataclass
class Batch:
    input_ids: Tensor  # (B, W) prompt+completion, right-padded
    attention_mask: Tensor  # (B, W)
    target_mask: Tensor  # (B, W-1) 1 where input_ids[:, t+1] is a completion token
    behaviour_token_logp: Tensor  # (B, W-1) aligned with target_mask (0 elsewhere)
    has_token_logp: Tensor  # (B,) bool: per-token behaviour log-probs were available
    ref_logp: Tensor  # (B,) behaviour log-prob sums (log π_ref)
    advantages: Tensor  # (B,)
    rewards: Tensor  # (B,)
    temperature: Tensor  # (B,) scoring temperature of each row: log softmax(logits / T)
    index: Tensor  # (B,) position of each row in the flattened record list
    # The same rows as distinct prompts and their continuations (``shared_prompt``'s layout):
    prompts: Tensor  # (U, P) the batch's distinct prompts, left-padded
    prompt_mask: Tensor  # (U, P)
    prompt_of: Tensor  # (B,) the row's prompt in ``prompts``
    completions: Tensor  # (B, C) right-padded
    completion_mask: Tensor  # (B, C)
    completion_at: Tensor  # (B, C) where each completion token's log-prob sits in (B, W-1)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def shares_prompts(self) -> bool:
        """Whether some rows continue the same prompt: the learner then runs each prompt once."""
        return len(self.prompts) < len(self)

    def to(self, device: torch.device) -> Batch:
        """This batch on ``device`` (itself when it is there already)."""
        if self.input_ids.device == device:
            return self
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def collate(records: Sequence[SequenceRecord], pad_id: int, indices: Sequence[int]) -> Batch:
    b = len(records)
    width = max(len(r.prompt_ids) + len(r.completion_ids) for r in records)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    target = torch.zeros((b, width - 1), dtype=torch.float32)
    beh = torch.zeros((b, width - 1), dtype=torch.float32)
    has_tok = torch.zeros(b, dtype=torch.bool)
    distinct, prompt_of = distinct_prompts([r.prompt_ids for r in records])
    prompts, prompt_mask = left_padded(distinct, pad_id)
    c_width = max(len(r.completion_ids) for r in records)
    completions = torch.full((b, c_width), pad_id, dtype=torch.long)
    c_mask = torch.zeros((b, c_width), dtype=torch.long)
    completion_at = torch.zeros((b, c_width), dtype=torch.long)
    for i, r in enumerate(records):
        p, c = len(r.prompt_ids), len(r.completion_ids)
        completions[i, :c] = torch.tensor(r.completion_ids, dtype=torch.long)
        c_mask[i, :c] = 1
        # past a row's end its (masked) slots point at its last token: the index stays in range
        completion_at[i] = (p - 1 + torch.arange(c_width)).clamp(max=p + c - 2)
        input_ids[i, : p + c] = torch.tensor(r.prompt_ids + r.completion_ids)
        attn[i, : p + c] = 1
        # logits at position t predict token t+1: completion tokens are predicted at p-1 … p+c-2
        target[i, p - 1 : p + c - 1] = 1.0
        if r.behaviour_logprobs is not None and len(r.behaviour_logprobs) == c:
            beh[i, p - 1 : p + c - 1] = torch.tensor(r.behaviour_logprobs)
            has_tok[i] = True
    return Batch(
        input_ids=input_ids,
        attention_mask=attn,
        target_mask=target,
        behaviour_token_logp=beh,
        has_token_logp=has_tok,
        ref_logp=torch.tensor([r.behaviour_logprob_sum for r in records], dtype=torch.float32),
        advantages=torch.tensor([r.advantage for r in records], dtype=torch.float32),
        rewards=torch.tensor([r.reward for r in records], dtype=torch.float32),
        temperature=torch.tensor([r.temperature for r in records], dtype=torch.float32),
        index=torch.tensor(list(indices), dtype=torch.long),
        prompts=prompts,
        prompt_mask=prompt_mask,
        prompt_of=torch.tensor(prompt_of, dtype=torch.long),
        completions=completions,
        completion_mask=c_mask,
        completion_at=completion_at,
    )


def micro_batches(records: Sequence[SequenceRecord], size: int, pad_id: int) -> list[Batch]:
    """Consecutive micro-batches of at most ``size`` sequences, in record order."""
    out = []
    for start in range(0, len(records), size):
        idx = list(range(start, min(start + size, len(records))))
        out.append(collate([records[i] for i in idx], pad_id, idx))
    return out


# --- generating and grading groups (used by sync-interval refreshes and the benchmark) -------

Grade = Callable[[list[dict[str, str]], str, dict[str, Any] | None], tuple[float, bool]]


def make_rollout_groups(
    backend: InferenceBackend,
    prompts: Sequence[PromptItem],
    group_size: int,
    params: SamplingParams,
    grade: Grade,
    adapter: AdapterRef | None = None,
    group_prefix: str = "",
) -> list[TrainingGroup]:
    """Sample ``group_size`` completions per prompt with the given snapshot and grade them."""
    outs = backend.generate([p.messages for p in prompts], group_size, params, adapter)
    groups = []
    ref_name = adapter.name if adapter is not None else "base"
    for p, comps in zip(prompts, outs, strict=True):
        graded = []
        for c in comps:
            reward, ok = grade(p.messages, c.text, p.outcome)
            graded.append(
                GradedCompletion(
                    token_ids=c.token_ids,
                    text=c.text,
                    behaviour_logprob_sum=c.logprob_sum,
                    reward=reward,
                    parse_ok=ok,
                    behaviour_logprobs=c.logprobs,
                )
            )
        groups.append(
            TrainingGroup(
                f"{group_prefix}{p.prompt_id}@{ref_name}",
                p.messages,
                graded,
                ref_name,
                temperature=params.temperature,
            )
        )
    return groups


def dump_groups_jsonl(groups: Iterable[TrainingGroup], path: str | Path) -> None:
    with open(path, "w") as f:
        for g in groups:
            f.write(json.dumps(asdict(g)) + "\n")


def load_groups_jsonl(path: str | Path) -> list[TrainingGroup]:
    """Read groups written by ``dump_groups_jsonl`` (one JSON object per line); a line without
    ``temperature`` (written before groups carried it) was sampled at T = 1."""
    groups = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                comps = [GradedCompletion(**c) for c in d.pop("completions")]
                groups.append(TrainingGroup(completions=comps, **d))
            except (TypeError, KeyError, ValueError) as exc:  # JSONDecodeError is a ValueError
                raise ValueError(f"{path}:{lineno}: not a training group: {exc}") from exc
    return groups
