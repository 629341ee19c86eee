"""The learner: OAPL (or the matched GRPO baseline) on a LoRA adapter, in one readable loop.

    groups ──filter zero-variance──▶ records (+ advantages) ──▶ for step in 1..S:
        every L steps (sync_interval): π_ref ← current policy; regenerate the coming window's groups
        for micro-batch in this step's sequences (this rank's share):
            log πθ(y|x) = Σ completion-token log-probs            (one forward, completion mask)
            loss += Σ_i ℓ_i / N_step                              (OAPL residual² or GRPO surrogate)
            backward
        all-reduce LoRA grads (data-parallel) → clip → AdamW step
        every eval_every steps: held-out parse rate / length → collapse guard
    write adapter atomically (rank 0) with manifest + lineage

Data-parallel under ``torchrun --nproc_per_node N`` (gloo on CPU): each rank takes every N-th
micro-batch and the LoRA gradients are summed across ranks before clipping. Because every loss
term is divided by the global sequence count, the sum equals the single-process gradient; only
floating-point summation order differs (tested to agree within 1e-5 relative on the loss curve).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from workers.inference.base import AdapterRef, InferenceBackend, SamplingParams
from workers.learner import adapters as adapter_io
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
    """One frozen configuration per run; ``validate()`` runs in ``__post_init__``."""

    algorithm: Literal["oapl", "grpo"] = "oapl"
    steps: int = 1
    """Optimizer steps. One OAPL "update" in the benchmark is steps=1 over all groups."""
    groups_per_step: int | None = None
    """Groups consumed per step; None = every group every step (full-batch)."""
    micro_batch_size: int = 64
    """Sequences per forward/backward; gradients accumulate over micro-batches of a step."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """AdamW, or plain SGD (with clipping, a normalised-gradient step: its first step follows the
    gradient's direction, where Adam's first step is elementwise sign(g)·lr)."""
    lr: float = 2e-3
    """Learning rate (constant). LoRA on a tiny model tolerates far more than 1e-6."""
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    beta1: float = 1.0
    """OAPL value temperature β₁ in V̂ = β₁·log mean exp(r/β₁)."""
    beta2: float = 0.02
    """OAPL log-ratio coefficient β₂; the target log-ratio of a sample is Â/β₂ nats."""
    ref_logprobs: Literal["behaviour", "rescore"] = "behaviour"
    """log π_ref source: the sampler's stored log-probs, or re-scoring with the start policy."""
    grpo_clip_eps: float = 0.2
    grpo_kl_coef: float = 0.0
    """GRPO k3-KL coefficient against the start policy (needs a rescoring pass when > 0)."""
    filter_zero_variance: bool = True
    sync_interval: int | None = None
    """L: refresh π_ref every L steps by regenerating with the current policy (needs a backend and
    a prompt pool); None = train on the given groups only (π_ref fixed)."""
    group_size: int = 8
    """G for regenerated groups."""
    max_new_tokens: int = 128
    temperature: float = 1.0
    eval_every: int = 0
    """Held-out evaluation every k steps for the collapse guard and curves (0 = off)."""
    guard_parse_drop: float = 0.3
    """Collapse: held-out parse rate fell this far (absolute) below its best so far."""
    guard_length_ratio: float = 0.4
    """Collapse: mean held-out completion length fell below this fraction of the initial one, or
    ran into the ``max_new_tokens`` cap (≥ 95% of it: answers no longer terminate). Growth below
    the cap is not collapse: a policy that learns to reason writes longer answers."""
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise TrainerConfigError("invalid trainer config: " + "; ".join(problems))

    def problems(self) -> list[str]:
        p = []
        if self.optimizer not in ("adamw", "sgd"):
            p.append(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.algorithm not in ("oapl", "grpo"):
            p.append(f"algorithm must be 'oapl' or 'grpo', got {self.algorithm!r}")
        if self.steps < 1:
            p.append(f"steps must be >= 1, got {self.steps}")
        if self.groups_per_step is not None and self.groups_per_step < 1:
            p.append(f"groups_per_step must be >= 1 or None, got {self.groups_per_step}")
        if self.micro_batch_size < 1:
            p.append(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            p.append(f"lr must be a positive finite number, got {self.lr}")
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
        if self.sync_interval is not None and self.groups_per_step is None:
            p.append("sync_interval needs groups_per_step (how many groups each step consumes)")
        if self.group_size < 1 or self.max_new_tokens < 1 or self.temperature <= 0:
            p.append("group_size, max_new_tokens and temperature must be positive")
        if self.eval_every < 0:
            p.append(f"eval_every must be >= 0, got {self.eval_every}")
        if not 0 < self.guard_length_ratio <= 1:
            p.append(f"guard_length_ratio must be in (0, 1], got {self.guard_length_ratio}")
        if self.max_grad_norm < 0:
            p.append(f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        if self.dtype not in ("float32", "bfloat16"):
            p.append(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        return p

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise TrainerConfigError(f"unknown trainer config keys: {sorted(unknown)}")
        d = dict(d)
        for key in ("target_modules", "adam_betas"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


@dataclass
class TrainResult:
    status: Literal["succeeded", "failed"]
    adapter_path: str | None
    metrics: dict[str, Any]
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


# --- model helpers ------------------------------------------------------------------------------


def sequence_logprobs(model: torch.nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """(Σ completion-token log-probs (B,), per-token log-probs (B, W-1) masked to completions).

    Scored at each row's sampling temperature, log softmax(logits / T): the distribution the
    sampler drew from and reported behaviour log-probs for, so at θ = θ_ref the log-ratio is 0.
    """
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    logits = out.logits[:, :-1, :].float() / batch.temperature[:, None, None]  # (B, W-1, V)
    targets = batch.input_ids[:, 1:]
    token_logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    token_logp = token_logp * batch.target_mask
    return token_logp.sum(dim=-1), token_logp


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_env() -> bool:
    """Join the torchrun process group (gloo) when launched with WORLD_SIZE > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
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


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# --- the loop -------------------------------------------------------------------------------------


def _mean_reward(groups: Sequence[TrainingGroup]) -> float:
    n = sum(len(g.completions) for g in groups)
    return sum(sum(g.rewards) for g in groups) / max(1, n)


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
    """Train a LoRA adapter on graded rollout groups and write it atomically to ``out_dir``.

    ``groups`` were sampled by the reference snapshot (``parent`` if given, else the base). With
    ``config.sync_interval`` = L the trainer instead regenerates groups from ``regenerate.prompts``
    with the current policy every L steps (``groups`` may then be empty). ``heldout_eval`` feeds
    the collapse guard and the history. ``out_dir=None`` skips writing (benchmarks).
    Raises ``TrainerConfigError`` before loading anything when the inputs cannot work.
    """
    from transformers import AutoTokenizer

    cfg = config
    if cfg.sync_interval is not None and regenerate is None:
        raise TrainerConfigError("sync_interval needs a RegenerationSource (backend + prompts)")
    if cfg.eval_every and heldout_eval is None:
        raise TrainerConfigError("eval_every > 0 needs a heldout_eval callable")
    if out_dir is not None and Path(out_dir).exists():
        raise adapter_io.AdapterExistsError(f"adapter directory already exists: {out_dir}")
    if cfg.sync_interval is None and not groups:
        raise TrainerConfigError("no rollout groups given")
    rank, world = _dist_info()
    if world > 1 and (cfg.sync_interval is not None or cfg.eval_every):
        raise TrainerConfigError("regeneration and held-out eval run single-process only")

    t0 = time.perf_counter()
    tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(str(base_path))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = load_policy(base_path, cfg, parent)
    params = _trainable(model)
    if world > 1:
        for p in params:  # identical start on every rank even if their init RNG differed
            dist.broadcast(p.data, src=0)
    opt: torch.optim.Optimizer
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(
            params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.adam_betas
        )
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    needs_frozen_ref = cfg.ref_logprobs == "rescore" or (
        cfg.algorithm == "grpo" and cfg.grpo_kl_coef > 0
    )
    frozen_ref = _frozen_copy(model) if needs_frozen_ref else None
    work = Path(tempfile.mkdtemp(prefix="tracelearn-train-"))
    rng = random.Random(cfg.seed)
    parent_ref = AdapterRef(Path(parent).name, str(parent)) if parent is not None else None

    history: list[dict[str, float]] = []
    used_group_ids: list[str] = []
    dropped_total = 0
    status: Literal["succeeded", "failed"] = "succeeded"
    failure: str | None = None
    best_parse = -1.0
    initial_length: float | None = None
    window: list[TrainingGroup] = []

    def snapshot(tag: str) -> AdapterRef:
        # Regeneration and held-out eval load the current policy through the backend, as
        # serving does.
        path = work / f"{tag}-{len(history)}-{time.monotonic_ns()}"
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

    def evaluate(step: int, adapter: AdapterRef | None) -> dict[str, float]:
        assert heldout_eval is not None
        return {f"heldout_{k}": float(v) for k, v in heldout_eval(adapter).items()}

    def collapsed(ev: dict[str, float]) -> str | None:
        nonlocal best_parse, initial_length
        parse, length = ev.get("heldout_parse_rate"), ev.get("heldout_mean_length")
        if parse is not None:
            if parse < best_parse - cfg.guard_parse_drop:
                return f"held-out parse rate fell from {best_parse:.2f} to {parse:.2f}"
            best_parse = max(best_parse, parse)
        if length is not None:
            if initial_length is None:
                initial_length = length
            elif length < cfg.guard_length_ratio * initial_length:
                return f"held-out completion length fell from {initial_length:.1f} to {length:.1f}"
            elif length >= 0.95 * cfg.max_new_tokens:
                return (f"held-out completions ran into the {cfg.max_new_tokens}-token cap "
                        f"(mean length {length:.1f}, was {initial_length:.1f})")
        return None

    def keep(new_groups: Sequence[TrainingGroup]) -> list[TrainingGroup]:
        nonlocal dropped_total
        kept = list(new_groups)
        if cfg.filter_zero_variance:
            kept, dropped = filter_zero_variance(kept)
            dropped_total += dropped
        used_group_ids.extend(g.group_id for g in kept)
        return kept

    if cfg.eval_every:
        ev = evaluate(0, parent_ref)
        collapsed(ev)
        history.append({"step": 0.0} | ev)

    pool = keep(groups) if cfg.sync_interval is None else []
    if cfg.sync_interval is None and not pool:
        raise ValueError("every rollout group has zero reward variance; nothing to learn from")

    model.train()
    for step in range(1, cfg.steps + 1):
        metrics: dict[str, float] = {"step": float(step)}
        # 1. this step's groups. With a sync interval, π_ref ← current policy every L steps and
        #    the next L steps' groups are regenerated by it (the lagged inference policy).
        if cfg.sync_interval is not None:
            assert regenerate is not None and cfg.groups_per_step is not None
            k = (step - 1) % cfg.sync_interval
            if k == 0:
                model.eval()
                ref = snapshot("sync") if step > 1 else parent_ref
                n = min(cfg.sync_interval, cfg.steps - step + 1) * cfg.groups_per_step
                start = (step - 1) * cfg.groups_per_step
                prompts = [
                    regenerate.prompts[(start + i) % len(regenerate.prompts)] for i in range(n)
                ]
                seed = cfg.seed * 7919 + step
                sp = SamplingParams(cfg.max_new_tokens, cfg.temperature, seed=seed)
                window = make_rollout_groups(
                    regenerate.backend,
                    prompts,
                    cfg.group_size,
                    sp,
                    regenerate.grade,
                    ref,
                    group_prefix=f"step{step}:",
                )
                if frozen_ref is not None:
                    frozen_ref = _frozen_copy(model)
                model.train()
                metrics["synced"] = 1.0
            raw = window[k * cfg.groups_per_step : (k + 1) * cfg.groups_per_step]
            metrics["train_reward"] = _mean_reward(raw)
            step_groups = keep(raw)
        elif cfg.groups_per_step is None:
            step_groups = pool
            metrics["train_reward"] = _mean_reward(pool)
        else:
            step_groups = rng.sample(pool, min(cfg.groups_per_step, len(pool)))
            metrics["train_reward"] = _mean_reward(step_groups)

        records = flatten_groups(step_groups, tok, cfg.algorithm, cfg.beta1)
        if not records:
            history.append(metrics | {"skipped": 1.0})
            continue
        batches = micro_batches(records, cfg.micro_batch_size, pad_id)

        # 2. forward/backward over this rank's micro-batches; Σ_i ℓ_i / N = the batch mean.
        n_total = len(records)
        opt.zero_grad(set_to_none=False)
        loss_sum = torch.zeros((), dtype=torch.float64)
        ratio_sum = torch.zeros((), dtype=torch.float64)
        for mb_i, mb in enumerate(batches):
            if mb_i % world != rank:
                continue
            seq_logp, tok_logp = sequence_logprobs(model, mb)
            ref_seq, ref_tok = mb.ref_logp, None
            if frozen_ref is not None:
                with torch.no_grad():
                    frozen_seq, ref_tok = sequence_logprobs(frozen_ref, mb)
                if cfg.ref_logprobs == "rescore":
                    ref_seq = frozen_seq
            if cfg.algorithm == "oapl":
                per_seq = oapl_sequence_losses(seq_logp, ref_seq, mb.advantages, cfg.beta2)
            else:
                # the clipped ratio is against the sampler's per-token log-probs when stored
                behaviour = torch.where(
                    mb.has_token_logp.unsqueeze(-1), mb.behaviour_token_logp, tok_logp.detach()
                )
                per_seq = grpo_sequence_losses(
                    tok_logp,
                    behaviour,
                    mb.target_mask,
                    mb.advantages,
                    cfg.grpo_clip_eps,
                    cfg.grpo_kl_coef,
                    ref_tok,
                )
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
        opt.step()
        metrics |= {
            "loss": float(loss_sum),
            "grad_norm": grad_norm,
            "mean_log_ratio": float(ratio_sum) / n_total,
            "n_sequences": float(n_total),
            "n_groups": float(len(step_groups)),
        }

        # 3. held-out eval and the collapse guard
        if cfg.eval_every and step % cfg.eval_every == 0:
            model.eval()
            ev = evaluate(step, snapshot("eval"))
            model.train()
            metrics |= ev
            reason = collapsed(ev)
            if reason is not None:
                status, failure = "failed", f"collapse guard at step {step}: {reason}"
        history.append(metrics)
        if progress is not None and rank == 0:
            progress(step, cfg.steps, metrics)
        if status == "failed":
            break

    model.eval()
    shutil.rmtree(work, ignore_errors=True)
    losses = [h["loss"] for h in history if "loss" in h]
    summary: dict[str, Any] = {
        "status": status,
        "failure_reason": failure,
        "steps_done": len(losses),
        "groups_used": len(used_group_ids),
        "groups_dropped_zero_variance": dropped_total,
        "final_loss": losses[-1] if losses else None,
        "seconds": round(time.perf_counter() - t0, 2),
        "world_size": world,
    }
    manifest = None
    adapter_path = None
    # A failed run never produces an adapter: nothing downstream can pick it up by accident.
    if out_dir is not None and status == "succeeded" and rank == 0:
        parent_info = None
        if parent is not None:
            pm = adapter_io.read_manifest(parent)
            parent_info = {"path": str(parent), "weights_sha256": pm.get("weights_sha256")}
        manifest = adapter_io.write_adapter(
            lambda d: model.save_pretrained(str(d)),
            out_dir,
            base_model_digest=adapter_io.model_digest(base_path),
            parent=parent_info,
            group_ids=used_group_ids,
            config=cfg.to_dict(),
            metrics=summary,
        )
        adapter_path = str(out_dir)
    if world > 1:
        dist.barrier()
    return TrainResult(status, adapter_path, summary, history, failure, manifest, model)


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref
