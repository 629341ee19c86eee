"""The learner: OAPL (or the matched GRPO baseline) on a LoRA adapter, in one readable loop.

One run is one round, "one update" in every report: groups sampled by one π_ref, π_ref held fixed,
and ``epochs × ⌈groups / groups_per_step⌉`` AdamW steps over shuffled partitions of the groups::

    groups ──drop zero-variance (unless kept)──▶ schedule: per epoch a permutation, cut in chunks
    for step, chunk in schedule:
        [sync_interval L: every L steps π_ref ← current policy, which samples the coming L
         steps' groups: the lagged inference policy; the chunks then index prompts. With
         window_passes k it samples L/k steps' prompts and the L steps pass over them k times]
        records (+ advantages: OAPL r − V̂ from losses.py, GRPO group-normalised)
        optimizer_step: for each micro-batch of this rank's share
            log πθ(y|x) = Σ completion-token log softmax(logits / T)     (T: the group's sampling T)
            loss += Σ_i ℓ_i / N_step ; backward
          all-reduce LoRA grads (data-parallel) → clip → AdamW at lr(step) (constant | cosine)
        every eval_every steps: held-out parse rate / length → collapse guard
    write adapter atomically (rank 0) with manifest + lineage

Data-parallel under ``torchrun --nproc_per_node N`` (gloo on CPU, NCCL with one GPU per rank on
``device: cuda``): every rank computes the same
schedule from the seed, takes every N-th micro-batch of a step, and the LoRA gradients are summed
across ranks before clipping. Because every loss term is divided by the step's global sequence
count, the sum equals the single-process gradient; only floating-point summation order differs
(tested to agree within 1e-4 relative on the loss curve).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from workers.inference.base import AdapterRef, InferenceBackend, SamplingParams
from workers.inference.chat import check_token_ids, embedding_rows
from workers.inference.shared_prompt import continuation_logits, prefill
from workers.learner import adapters as adapter_io
from workers.learner.allocator import allocator_in_use
from workers.learner.data import (
    Batch,
    Grade,
    PromptItem,
    TrainingGroup,
    filter_zero_variance,
    flatten_groups,
    make_rollout_groups,
    micro_batches,
)
from workers.learner.losses import grpo_sequence_losses, oapl_sequence_losses

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TrainerConfigError(ValueError):
    """The trainer configuration is invalid; raised before any model is loaded."""


@dataclass(frozen=True)
class TrainerConfig:
    """One frozen configuration per run; invalid values raise ``TrainerConfigError`` on creation.

    The round defaults are the OAPL point ``python -m benchmarks.tune_round`` chose on
    validation prompts of the bundled model (``benchmarks/results/tune_round.json``, 128 prompts
    × 8 rollouts): 16 groups per step, 8 epochs, lr 3e-3, β₂ 0.1, rank-16 LoRA (α 32), groups of
    equal rewards dropped: 41.6% validation correctness against 2.7% for the base model and
    20.7% for the best GRPO point; 32 steps of the same groups beat one full-batch step (24%).
    β₂ 1e-3 (the paper's, for very long answers) collapses on our short answers.
    """

    algorithm: Literal["oapl", "grpo"] = "oapl"

    # --- the round: which groups each optimizer step sees
    epochs: int = 8
    """Passes over the round's groups; each pass is a new permutation of all of them."""
    groups_per_step: int = 16
    """Groups per optimizer step (a step's sequences: these groups' completions). Each epoch's
    permutation is cut into consecutive chunks of this many (the last may be smaller), so a run
    takes epochs × ⌈groups / groups_per_step⌉ steps; ≥ the group count = one full-batch step per
    epoch (a sign step for AdamW: m̂/√v̂ = g/|g| on the first step)."""
    micro_batch_size: int = 64
    """Sequences per forward/backward; gradients accumulate over the micro-batches of a step."""
    keep_zero_variance_groups: bool = False
    """Keep groups whose rewards are all equal. Their OAPL advantage is Â = 0, which still pulls
    log πθ/π_ref toward 0 (an anchor to the reference); GRPO gets no gradient from them. False
    drops them before the schedule is drawn (counted in ``groups_dropped_zero_variance``)."""

    # --- the optimizer
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """AdamW, or plain SGD (with clipping, a normalised-gradient step)."""
    lr: float = 3e-3
    """Peak learning rate (parameter units per step). LoRA on a tiny model takes far more than
    the paper's 1e-6."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """After warm-up: ``lr`` throughout, or cosine decay from ``lr`` toward 0 at the run's end."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up: 0-based step s < W uses lr·(s+1)/W."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (fraction of a weight removed per unit of lr); SGD: L2."""
    adam_beta1: float = 0.9
    """AdamW decay of the first-moment (mean gradient) average, per step."""
    adam_beta2: float = 0.999
    """AdamW decay of the second-moment (squared gradient) average, per step."""
    adam_eps: float = 1e-8
    """AdamW denominator term, in gradient units."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip, L2 over all LoRA parameters (0 disables)."""

    # --- the adapter
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS

    # --- the losses
    beta1: float = 1.0
    """OAPL value temperature β₁ (reward units) in V̂ = β₁·log mean exp(r/β₁)."""
    beta2: float = 0.1
    """OAPL log-ratio coefficient β₂ (reward units per nat); a sample's target log-ratio is Â/β₂
    nats."""
    ref_logprobs: Literal["behaviour", "rescore"] = "behaviour"
    """log π_ref source: the sampler's stored log-probs, or re-scoring with a frozen copy of π_ref
    (at each group's sampling temperature, like πθ)."""
    grpo_clip_eps: float = 0.2
    """GRPO ratio clip ε (dimensionless): ρ is clipped to [1−ε, 1+ε]."""
    grpo_kl_coef: float = 0.0
    """GRPO k3-KL coefficient against π_ref (needs a re-scoring pass when > 0)."""

    # --- multi-step lag: regenerate with the current policy
    sync_interval: int | None = None
    """L, in optimizer steps: every L steps π_ref ← the current policy, which samples the groups
    of the coming L steps from ``RegenerationSource.prompts`` (the schedule then partitions the
    prompts: epochs × ⌈prompts / groups_per_step⌉ steps). None = train on the given groups with
    π_ref fixed for the whole run."""
    window_passes: int = 1
    """With ``sync_interval`` L: passes the learner makes over each window's sampled groups
    before π_ref regenerates. A window samples the prompts of L / passes steps once and the L
    optimizer steps shuffle those groups ``window_passes`` times (each pass a new permutation cut
    into ``groups_per_step`` chunks), so sampling costs 1/passes per step — what a lagged
    reference allows and on-policy GRPO does not. 1 = every step's groups are sampled for it
    (one pass). L must be a multiple of it."""
    group_size: int = 8
    """G (completions per prompt) for regenerated groups."""
    max_new_tokens: int = 128
    """Completion cap (tokens) for regenerated groups; also the collapse guard's cap."""
    temperature: float = 1.0
    """Sampling temperature of regenerated groups (they carry it; scoring uses it)."""

    # --- held-out evaluation and the collapse guard
    eval_every: int = 0
    """Held-out evaluation every k optimizer steps for the collapse guard and curves (0 = off)."""
    guard_parse_drop: float = 0.3
    """Collapse: held-out parse rate fell this far (absolute) below its best so far."""
    guard_length_ratio: float = 0.4
    """Collapse: mean held-out completion length fell below this fraction of the initial one, or
    ran into the ``max_new_tokens`` cap (≥ 95% of it: answers no longer terminate). Growth below
    the cap is not collapse: a policy that learns to reason writes longer answers."""

    seed: int = 0
    """Seeds the LoRA init, the epoch permutations and regeneration sampling."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the learner trains: ``cuda`` (a GPU; under torchrun rank r takes GPU LOCAL_RANK
    and the ranks talk over NCCL), ``cpu`` (gloo between ranks), or ``auto``: a GPU when torch
    sees one. Checked when the round starts, not here: a policy's config is written on the API
    host, which need not have the learner's GPU. Set ``cpu`` where the GPU is serving's alone."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise TrainerConfigError("invalid trainer config: " + "; ".join(problems))

    def problems(self) -> list[str]:
        p = []
        if self.algorithm not in ("oapl", "grpo"):
            p.append(f"algorithm must be 'oapl' or 'grpo', got {self.algorithm!r}")
        if self.epochs < 1:
            p.append(f"epochs must be >= 1, got {self.epochs}")
        if self.groups_per_step < 1:
            p.append(f"groups_per_step must be >= 1, got {self.groups_per_step}")
        if self.micro_batch_size < 1:
            p.append(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.optimizer not in ("adamw", "sgd"):
            p.append(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            p.append(f"lr must be a positive finite number, got {self.lr}")
        if self.lr_schedule not in ("constant", "cosine"):
            p.append(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.warmup_steps < 0:
            p.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            p.append(f"adam_beta1 and adam_beta2 must be in [0, 1), got "
                     f"{self.adam_beta1}, {self.adam_beta2}")
        if not self.adam_eps > 0:
            p.append(f"adam_eps must be > 0, got {self.adam_eps}")
        if self.max_grad_norm < 0:
            p.append(f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        if self.lora_rank < 1:
            p.append(f"lora_rank must be >= 1, got {self.lora_rank}")
        if self.lora_alpha <= 0:
            p.append(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            p.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.target_modules:
            p.append("target_modules must name at least one module")
        if self.beta1 <= 0:
            p.append(f"beta1 must be > 0, got {self.beta1}")
        if self.beta2 < 0:
            p.append(f"beta2 must be >= 0, got {self.beta2}")
        if self.ref_logprobs not in ("behaviour", "rescore"):
            p.append(f"ref_logprobs must be 'behaviour' or 'rescore', got {self.ref_logprobs!r}")
        if self.sync_interval is not None and self.sync_interval < 1:
            p.append(f"sync_interval must be >= 1 or None, got {self.sync_interval}")
        if self.window_passes < 1:
            p.append(f"window_passes must be >= 1, got {self.window_passes}")
        elif self.window_passes > 1 and (self.sync_interval is None
                                         or self.sync_interval % self.window_passes):
            p.append(f"window_passes {self.window_passes} needs a sync_interval that is a "
                     f"multiple of it, got {self.sync_interval}")
        if self.group_size < 1 or self.max_new_tokens < 1 or self.temperature <= 0:
            p.append("group_size, max_new_tokens and temperature must be positive")
        if self.eval_every < 0:
            p.append(f"eval_every must be >= 0, got {self.eval_every}")
        if not 0 < self.guard_length_ratio <= 1:
            p.append(f"guard_length_ratio must be in (0, 1], got {self.guard_length_ratio}")
        if self.dtype not in ("float32", "bfloat16"):
            p.append(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            p.append(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        return p

    @property
    def needs_frozen_reference(self) -> bool:
        """log π_ref is re-scored on the trainer (not taken from the sampler)."""
        grpo_kl = self.algorithm == "grpo" and self.grpo_kl_coef > 0
        return self.ref_logprobs == "rescore" or grpo_kl

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise TrainerConfigError(f"unknown trainer config keys: {sorted(unknown)}")
        d = dict(d)
        if "target_modules" in d:
            d["target_modules"] = tuple(d["target_modules"])
        return cls(**d)


@dataclass
class TrainResult:
    status: Literal["succeeded", "failed"]
    adapter_path: str | None
    metrics: dict[str, Any]
    """Run summary: status, failure_reason, optimizer_steps, epochs (passes made, a float when a
    run stopped mid-epoch), groups_used (distinct groups trained on), groups_dropped_zero_variance,
    final_loss, seconds, world_size, allocator (``jemalloc`` or ``system``: what this process's
    malloc is, ``workers.learner.allocator``). The manifest records the same dict."""
    history: list[dict[str, float]] = field(default_factory=list)
    failure_reason: str | None = None
    manifest: dict[str, Any] | None = None
    model: Any = None
    """The trained peft model (in memory), for callers that evaluate without reloading."""


ProgressFn = Callable[[int, int, dict[str, float]], None]
"""progress(step, total_steps, metrics) after every optimizer step (rank 0 only)."""
HeldoutEval = Callable[[AdapterRef | None], dict[str, float]]
"""Evaluate a snapshot on held-out prompts → {"parse_rate", "correct", "mean_length", ...}."""


@dataclass
class RegenerationSource:
    """What a sync-interval run needs to regenerate π_ref's groups: a backend, prompts, a grader."""

    backend: InferenceBackend
    prompts: Sequence[PromptItem]
    grade: Grade


# --- the schedule ---------------------------------------------------------------------------------


def partition_schedule(
    n_groups: int, groups_per_step: int, epochs: int, seed: int
) -> list[list[int]]:
    """The round's optimizer steps, as lists of group indices: each epoch a new permutation of
    ``range(n_groups)`` cut into consecutive chunks of ``groups_per_step`` (the last may be
    smaller). Every group exactly once per epoch; ``epochs × ⌈n_groups / groups_per_step⌉`` steps;
    the same seed gives the same schedule (every data-parallel rank draws it identically)."""
    rng = random.Random(seed)
    steps: list[list[int]] = []
    for _ in range(epochs):
        order = list(range(n_groups))
        rng.shuffle(order)
        steps.extend(order[i : i + groups_per_step] for i in range(0, n_groups, groups_per_step))
    return steps


@dataclass(frozen=True)
class WindowPlan:
    """One sync window of a lagged run: the prompts π_ref samples once (indices into the
    regeneration prompts, in sampling order) and, per optimizer step, the positions in that list
    whose groups the step trains on."""

    first_step: int
    prompts: list[int]
    steps: list[list[int]]


def window_plans(
    schedule: list[list[int]], sync_interval: int, passes: int, groups_per_step: int, seed: int
) -> list[WindowPlan]:
    """Cut a lagged run into sync windows. Each window samples the prompts of ``sync_interval /
    passes`` consecutive schedule chunks; with one pass its steps are those chunks as drawn,
    with more each pass is a new permutation of the window's groups cut into chunks of
    ``groups_per_step``. A full window has ``sync_interval`` steps; one holding an epoch's
    short last chunk may have fewer, and the next window starts right after it."""
    per_window = sync_interval // passes
    rng = random.Random(seed * 104_729 + passes)
    plans: list[WindowPlan] = []
    step = 1
    for w in range(0, len(schedule), per_window):
        chunks = schedule[w : w + per_window]
        prompts = [i for chunk in chunks for i in chunk]
        if passes == 1:
            steps, start = [], 0
            for chunk in chunks:
                steps.append(list(range(start, start + len(chunk))))
                start += len(chunk)
        else:
            steps = partition_schedule(len(prompts), groups_per_step, passes, rng.randrange(2**31))
        plans.append(WindowPlan(step, prompts, steps))
        step += len(steps)
    return plans


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int) -> float:
    """Multiplier on ``lr`` at 0-based optimizer step s of S = ``total_steps``, W = warm-up steps:

        s < W             (s + 1) / W                              linear warm-up, reaches 1 at W−1
        constant          1
        cosine            ½ · (1 + cos(π · (s − W) / (S − W)))     1 at s = W, toward 0 at s = S
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def select_groups(
    groups: Sequence[TrainingGroup], keep_zero_variance: bool
) -> tuple[list[TrainingGroup], int]:
    """The groups to train on and how many were dropped for zero reward variance."""
    if keep_zero_variance:
        return list(groups), 0
    return filter_zero_variance(groups)


# --- model helpers --------------------------------------------------------------------------------


def sequence_logprobs(model: torch.nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """(Σ completion-token log-probs (B,), per-token log-probs (B, W-1) masked to completions).

    Scored at each row's sampling temperature, log softmax(logits / T), the distribution the
    sampler drew from and reported behaviour log-probs for: at θ = θ_ref the log-ratio is 0.
    When rows share prompts (a group's completions do), each prompt runs once and its rows
    continue its KV cache (``shared_prompt``): the same log-probs for a fraction of the work.
    """
    rows = embedding_rows(model)
    ids = batch.input_ids
    # Two reductions instead of a host copy of the batch; the list walk only names the bad id.
    if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < rows:
        check_token_ids(ids.tolist(), rows)
    temperature = batch.temperature[:, None, None]
    if batch.shares_prompts:
        state = prefill(model, batch.prompts, batch.prompt_mask).for_rows(batch.prompt_of)
        logits = continuation_logits(model, state, batch.completions, batch.completion_mask)
        completion_logp = torch.log_softmax(logits.float() / temperature, dim=-1).gather(
            -1, batch.completions.unsqueeze(-1)).squeeze(-1) * batch.completion_mask
        token_logp = torch.zeros_like(batch.target_mask).scatter_add(
            1, batch.completion_at, completion_logp)
    else:
        out = model(input_ids=ids, attention_mask=batch.attention_mask, use_cache=False)
        logits = out.logits[:, :-1, :].float() / temperature  # (B, W-1, V)
        token_logp = torch.log_softmax(logits, dim=-1).gather(
            -1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    token_logp = token_logp * batch.target_mask
    return token_logp.sum(dim=-1), token_logp


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def device_problem(choice: str, processes: int = 1) -> str | None:
    """Why ``processes`` learner processes cannot train on ``choice`` here (None: they can)."""
    if choice != "cuda":
        return None
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        return "device 'cuda' was asked for, but torch sees no GPU on this machine"
    if processes > gpus:
        return f"{processes} learner processes on 'cuda' need {processes} GPUs; torch sees {gpus}"
    return None


def on_gpu(choice: str) -> bool:
    """Whether learner processes asked to train on ``choice`` train on GPUs here: ``cuda``, or
    ``auto`` where torch sees a GPU."""
    return choice == "cuda" or (choice == "auto" and torch.cuda.is_available())


def resolve_device(choice: str) -> torch.device:
    """The device this process trains on: under torchrun, rank r's GPU is LOCAL_RANK (torchrun
    sets it) so that no two ranks share one; ``auto`` is a GPU when torch sees one."""
    choice = "cuda" if on_gpu(choice) else "cpu"
    problem = device_problem(choice, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if problem is not None:
        raise TrainerConfigError(problem)
    if choice == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed_from_env(cfg: TrainerConfig) -> bool:
    """Join the torchrun process group when launched with WORLD_SIZE > 1: NCCL between GPUs,
    gloo between CPU processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        device = resolve_device(cfg.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.is_initialized()


def load_policy(base_path: str | Path, cfg: TrainerConfig, parent: str | Path | None) -> Any:
    """Base model + LoRA: fresh (B=0, so the policy starts equal to the base) or the parent's."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if cfg.dtype == "float32" else torch.bfloat16
    base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=dtype)
    if parent is not None:
        adapter_io.load_verified(parent)
        return PeftModel.from_pretrained(base, str(parent), is_trainable=True)
    torch.manual_seed(cfg.seed)
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,  # type: ignore[arg-type]  # peft accepts floats
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, lora)


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainerConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
    )


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def _snapshot(model: Any, work: Path, tag: str, step: int, cfg: TrainerConfig) -> AdapterRef:
    """Write the current policy as an adapter, so regeneration and held-out evaluation load it
    through the backend exactly as serving does."""
    path = work / f"{tag}-{step}-{time.monotonic_ns()}"
    adapter_io.write_adapter(
        lambda d: model.save_pretrained(str(d)),
        path,
        base_model_digest="",
        parent=None,
        group_ids=[],
        config=cfg.to_dict(),
        metrics={},
    )
    return AdapterRef(name=path.name, path=str(path))


# --- the named pieces of the loop -----------------------------------------------------------------


@dataclass
class CollapseGuard:
    """Stops a run whose held-out behaviour collapsed: the parse rate fell ``parse_drop`` below
    its best, or the mean length fell below ``length_ratio`` × the first one or ran into the
    ``max_new_tokens`` cap."""

    parse_drop: float
    length_ratio: float
    max_new_tokens: int
    best_parse: float = -1.0
    initial_length: float | None = None

    def check(self, ev: dict[str, float]) -> str | None:
        """Record one held-out evaluation; the reason the run collapsed, or None."""
        parse, length = ev.get("heldout_parse_rate"), ev.get("heldout_mean_length")
        if parse is not None:
            if parse < self.best_parse - self.parse_drop:
                return f"held-out parse rate fell from {self.best_parse:.2f} to {parse:.2f}"
            self.best_parse = max(self.best_parse, parse)
        if length is None:
            return None
        if self.initial_length is None:
            self.initial_length = length
        elif length < self.length_ratio * self.initial_length:
            return f"held-out completion length fell from {self.initial_length:.1f} to {length:.1f}"
        elif length >= 0.95 * self.max_new_tokens:
            return (f"held-out completions ran into the {self.max_new_tokens}-token cap "
                    f"(mean length {length:.1f}, was {self.initial_length:.1f})")
        return None


@dataclass
class ReferenceWindow:
    """π_ref for a run of steps: the groups it sampled for each of them, and a frozen copy of it
    when log π_ref is re-scored rather than taken from the sampler.

    Without a sync interval one window spans the whole run (π_ref = the start policy, the groups
    given). With L, every L steps the current policy becomes π_ref and samples the coming steps'
    groups (``regenerate_window``)."""

    groups: dict[int, list[TrainingGroup]]
    """1-based step → the groups that step trains on (before the zero-variance filter)."""
    frozen: torch.nn.Module | None


def fixed_window(
    pool: Sequence[TrainingGroup], schedule: list[list[int]], model: torch.nn.Module,
    cfg: TrainerConfig,
) -> ReferenceWindow:
    groups = {step: [pool[i] for i in chunk] for step, chunk in enumerate(schedule, start=1)}
    return ReferenceWindow(groups, _frozen_copy(model) if cfg.needs_frozen_reference else None)


def regenerate_window(
    model: torch.nn.Module,
    reference: AdapterRef | None,
    source: RegenerationSource,
    plan: WindowPlan,
    cfg: TrainerConfig,
) -> ReferenceWindow:
    """π_ref ← the current policy (``reference``: a snapshot of it, or the parent at step 1); it
    samples the window's prompts in one generate call, and each of the window's steps gets its
    groups."""
    prompts = [source.prompts[i] for i in plan.prompts]
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature,
                            seed=cfg.seed * 7919 + plan.first_step)
    sampled = make_rollout_groups(
        source.backend, prompts, cfg.group_size, params, source.grade, reference
    )
    groups: dict[int, list[TrainingGroup]] = {}
    for step, positions in enumerate(plan.steps, start=plan.first_step):
        # a prompt can come twice in one window (across an epoch boundary): the position keeps
        # ids unique, and a group trained in several passes keeps its one id
        groups[step] = [replace(sampled[i], group_id=f"w{plan.first_step}:{i}:"
                                f"{sampled[i].group_id}") for i in positions]
    return ReferenceWindow(groups, _frozen_copy(model) if cfg.needs_frozen_reference else None)


def sequence_losses(
    model: torch.nn.Module, frozen_ref: torch.nn.Module | None, mb: Batch, cfg: TrainerConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """(per-sequence loss ℓ_i (B,), log πθ (B,), log π_ref (B,)) for one micro-batch."""
    seq_logp, tok_logp = sequence_logprobs(model, mb)
    ref_seq, ref_tok = mb.ref_logp, None
    if frozen_ref is not None:
        with torch.no_grad():
            frozen_seq, ref_tok = sequence_logprobs(frozen_ref, mb)
        if cfg.ref_logprobs == "rescore":
            ref_seq = frozen_seq
    if cfg.algorithm == "oapl":
        return oapl_sequence_losses(seq_logp, ref_seq, mb.advantages, cfg.beta2), seq_logp, ref_seq
    # GRPO's clipped ratio is against the sampler's per-token log-probs where they are stored
    behaviour = torch.where(
        mb.has_token_logp.unsqueeze(-1), mb.behaviour_token_logp, tok_logp.detach()
    )
    per_seq = grpo_sequence_losses(
        tok_logp, behaviour, mb.target_mask, mb.advantages, cfg.grpo_clip_eps, cfg.grpo_kl_coef,
        ref_tok,
    )
    return per_seq, seq_logp, ref_seq


def optimizer_step(
    model: torch.nn.Module,
    frozen_ref: torch.nn.Module | None,
    opt: torch.optim.Optimizer,
    lr: float,
    batches: list[Batch],
    cfg: TrainerConfig,
) -> dict[str, float]:
    """One optimizer step on one step's sequences: Σ_i ℓ_i / N over this rank's micro-batches
    (summed across data-parallel ranks: the batch mean), gradient clip, the update at ``lr``."""
    rank, world = _dist_info()
    params = [p for g in opt.param_groups for p in g["params"]]
    n_total = sum(len(mb) for mb in batches)
    opt.zero_grad(set_to_none=False)
    # On the parameters' device: NCCL reduces GPU tensors only.
    device = params[0].device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    ratio_sum = torch.zeros((), dtype=torch.float64, device=device)
    for mb in batches[rank::world]:
        per_seq, seq_logp, ref_seq = sequence_losses(model, frozen_ref, mb, cfg)
        loss = per_seq.sum() / n_total
        loss.backward()
        loss_sum += float(loss.detach())
        ratio_sum += float((seq_logp.detach() - ref_seq).sum())
    if world > 1:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
        dist.all_reduce(ratio_sum, op=dist.ReduceOp.SUM)
    grads = [p.grad for p in params if p.grad is not None]
    grad_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    return {
        "loss": float(loss_sum),
        "grad_norm": grad_norm,
        "lr": lr,
        "mean_log_ratio": float(ratio_sum) / n_total,
        "n_sequences": float(n_total),
    }


def _mean_reward(groups: Sequence[TrainingGroup]) -> float:
    n = sum(len(g.completions) for g in groups)
    return sum(sum(g.rewards) for g in groups) / max(1, n)


def _heldout(heldout_eval: HeldoutEval | None, adapter: AdapterRef | None) -> dict[str, float]:
    assert heldout_eval is not None
    return {f"heldout_{k}": float(v) for k, v in heldout_eval(adapter).items()}


def _check_inputs(
    groups: Sequence[TrainingGroup],
    out_dir: str | Path | None,
    cfg: TrainerConfig,
    regenerate: RegenerationSource | None,
    heldout_eval: HeldoutEval | None,
) -> None:
    if cfg.sync_interval is not None and regenerate is None:
        raise TrainerConfigError("sync_interval needs a RegenerationSource (backend + prompts)")
    if cfg.sync_interval is not None and regenerate is not None and not regenerate.prompts:
        raise TrainerConfigError("sync_interval needs at least one prompt to regenerate from")
    if cfg.eval_every and heldout_eval is None:
        raise TrainerConfigError("eval_every > 0 needs a heldout_eval callable")
    if out_dir is not None and Path(out_dir).exists():
        raise adapter_io.AdapterExistsError(f"adapter directory already exists: {out_dir}")
    if cfg.sync_interval is None and not groups:
        raise TrainerConfigError("no rollout groups given")
    if _dist_info()[1] > 1 and (cfg.sync_interval is not None or cfg.eval_every):
        raise TrainerConfigError("regeneration and held-out eval run single-process only")


def _write_final_adapter(
    model: Any,
    out_dir: str | Path,
    base_path: str | Path,
    parent: str | Path | None,
    group_ids: list[str],
    cfg: TrainerConfig,
    summary: dict[str, Any],
) -> dict[str, Any]:
    parent_info = None
    if parent is not None:
        pm = adapter_io.read_manifest(parent)
        parent_info = {"path": str(parent), "weights_sha256": pm.get("weights_sha256")}
    return adapter_io.write_adapter(
        lambda d: model.save_pretrained(str(d)),
        out_dir,
        base_model_digest=adapter_io.model_digest(base_path),
        parent=parent_info,
        group_ids=group_ids,
        config=cfg.to_dict(),
        metrics=summary,
    )


# --- the loop -------------------------------------------------------------------------------------


def train(
    groups: Sequence[TrainingGroup],
    base_path: str | Path,
    out_dir: str | Path | None,
    config: TrainerConfig,
    *,
    parent: str | Path | None = None,
    tokenizer: Any = None,
    regenerate: RegenerationSource | None = None,
    heldout_eval: HeldoutEval | None = None,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Train a LoRA adapter on graded groups (one round) and write it atomically to ``out_dir``.

    ``groups`` were sampled by the reference snapshot (``parent`` if given, else the base). With
    ``config.sync_interval`` = L the trainer instead regenerates groups from ``regenerate.prompts``
    with the current policy every L steps (``groups`` may then be empty). ``heldout_eval`` feeds
    the collapse guard and the history. ``out_dir=None`` skips writing (benchmarks).
    Raises ``TrainerConfigError`` before loading anything when the inputs cannot work.
    """
    from transformers import AutoTokenizer

    cfg = config
    _check_inputs(groups, out_dir, cfg, regenerate, heldout_eval)
    device = resolve_device(cfg.device)  # a GPU asked for and absent: refused before loading
    rank, world = _dist_info()
    t0 = time.perf_counter()

    # The round's schedule: over the given groups, or, with a sync interval, over the prompts
    # that each window's π_ref samples afresh.
    sync = cfg.sync_interval
    source = regenerate if sync is not None else None
    pool, dropped_total = select_groups(groups, cfg.keep_zero_variance_groups)
    if source is None and not pool:
        raise ValueError("every rollout group has zero reward variance; nothing to learn from")
    n_items = len(pool) if source is None else len(source.prompts)
    schedule = partition_schedule(n_items, cfg.groups_per_step, cfg.epochs, cfg.seed)
    plans = ({} if sync is None else
             {p.first_step: p for p in window_plans(schedule, sync, cfg.window_passes,
                                                    cfg.groups_per_step, cfg.seed)})
    total_steps = sum(len(p.steps) for p in plans.values()) if plans else len(schedule)
    # an epoch is one pass over the prompts; with several passes per window it takes more steps
    steps_per_epoch = math.ceil(total_steps / cfg.epochs)

    tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(str(base_path))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = load_policy(base_path, cfg, parent).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if world > 1:
        for p in params:  # identical start on every rank even if their init RNG differed
            dist.broadcast(p.data, src=0)
    opt = make_optimizer(params, cfg)
    parent_ref = AdapterRef(Path(parent).name, str(parent)) if parent is not None else None
    window = fixed_window(pool, schedule, model, cfg) if source is None else None
    guard = CollapseGuard(cfg.guard_parse_drop, cfg.guard_length_ratio, cfg.max_new_tokens)
    history: list[dict[str, float]] = []
    used: dict[str, None] = {}  # group ids trained on, in first-use order
    optimizer_steps = steps_run = 0
    failure: str | None = None
    work = Path(tempfile.mkdtemp(prefix="tracelearn-train-"))  # snapshots for sync and eval
    # The folder goes whatever ends the round: a collapse, a caller's progress hook raising to
    # stop it (the time-to-target benchmark, a cancelled run), or an error mid-step.
    try:
        if cfg.eval_every:
            ev = _heldout(heldout_eval, parent_ref)
            guard.check(ev)
            history.append({"step": 0.0} | ev)

        model.train()
        for step in range(1, total_steps + 1):
            steps_run = step
            metrics: dict[str, float] = {
                "step": float(step), "epoch": float((step - 1) // steps_per_epoch + 1)
            }
            # 1. this step's groups; with a sync interval, every L steps π_ref ← current policy
            if source is not None and step in plans:
                model.eval()
                reference = parent_ref if step == 1 else _snapshot(model, work, "sync", step, cfg)
                window = regenerate_window(model, reference, source, plans[step], cfg)
                model.train()
                metrics["synced"] = 1.0
            assert window is not None
            sampled = window.groups[step]
            step_groups, dropped = select_groups(sampled, cfg.keep_zero_variance_groups)
            dropped_total += dropped  # regenerated groups; a fixed pool was filtered above
            metrics["train_reward"] = _mean_reward(sampled)
            metrics["n_groups"] = float(len(step_groups))
            records = flatten_groups(step_groups, tok, cfg.algorithm, cfg.beta1)
            if not records:
                history.append(metrics | {"skipped": 1.0})
                continue

            # 2. one optimizer step over the step's sequences
            lr = cfg.lr * lr_factor(step - 1, total_steps, cfg.lr_schedule, cfg.warmup_steps)
            batches = [mb.to(device) for mb in micro_batches(records, cfg.micro_batch_size, pad_id)]
            metrics |= optimizer_step(model, window.frozen, opt, lr, batches, cfg)
            optimizer_steps += 1
            used.update(dict.fromkeys(g.group_id for g in step_groups))

            # 3. held-out eval and the collapse guard
            if cfg.eval_every and step % cfg.eval_every == 0:
                model.eval()
                ev = _heldout(heldout_eval, _snapshot(model, work, "eval", step, cfg))
                model.train()
                metrics |= ev
                reason = guard.check(ev)
                if reason is not None:
                    failure = f"collapse guard at step {step}: {reason}"
            history.append(metrics)
            if progress is not None and rank == 0:
                progress(step, total_steps, metrics)
            if failure is not None:
                break
    finally:
        shutil.rmtree(work, ignore_errors=True)

    model.eval()
    status: Literal["succeeded", "failed"] = "failed" if failure else "succeeded"
    losses = [h["loss"] for h in history if "loss" in h]
    summary: dict[str, Any] = {
        "status": status,
        "failure_reason": failure,
        "optimizer_steps": optimizer_steps,
        "epochs": round(steps_run / steps_per_epoch, 4),
        "groups_used": len(used),
        "groups_dropped_zero_variance": dropped_total,
        "final_loss": losses[-1] if losses else None,
        "seconds": round(time.perf_counter() - t0, 2),
        "world_size": world,
        "device": str(device),
        "allocator": allocator_in_use(),
    }
    manifest = None
    # A failed run never produces an adapter: nothing downstream can pick it up by accident.
    if out_dir is not None and status == "succeeded" and rank == 0:
        manifest = _write_final_adapter(model, out_dir, base_path, parent, list(used), cfg, summary)
    if world > 1:
        dist.barrier()
    adapter_path = str(out_dir) if manifest is not None else None
    return TrainResult(status, adapter_path, summary, history, failure, manifest, model)
