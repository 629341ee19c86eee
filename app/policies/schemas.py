from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, field_validator

POLICY_NAME = r"^[a-z0-9][a-z0-9-]{0,47}$"


class SamplingSpec(BaseModel):
    """How rollouts are sampled. No top-p/top-k: OAPL takes π_ref from the sampler's log-probs,
    which must be those of the untruncated distribution."""

    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(default=1.0, gt=0.0, le=2.0)
    max_tokens: int = Field(default=96, ge=1, le=8192)


class GraderSpec(BaseModel):
    """Which grader scores rollouts; extra keys are passed to the grader."""

    model_config = ConfigDict(extra="allow")
    kind: str = Field(default="contract", min_length=1, max_length=64)
    outcome: str = Field(default="pfs_gt_180d", description="Outcome name holding the label.")


class GateSpec(BaseModel):
    """What a candidate must show against the champion (the serving snapshot, evaluated on the
    same held-out prompts and seeds) before it awaits human approval.

    The default is relative: the primary metric's paired-bootstrap 95% CI lower bound must be
    above zero, and no other gated metric (parse rate included) may drop by more than
    ``max_secondary_regression``. Absolute floors are opt-in.
    """

    model_config = ConfigDict(extra="forbid")
    primary_metric: Literal["correct", "mean_reward", "parse_rate"] = "correct"
    require_significant_gain: bool = Field(
        default=True, description="The primary metric's paired 95% CI lower bound must be > 0."
    )
    max_secondary_regression: float = Field(
        default=0.05, ge=0.0, description="Max drop allowed on any other gated metric "
        "(correct, mean_reward, parse_rate), in absolute units."
    )
    min_eval_n: int = Field(default=20, ge=1, description="Fewest held-out prompts to decide on.")
    min_abs_gain: float | None = Field(
        default=None, description="Opt-in: min primary-metric gain over the champion."
    )
    min_rel_gain: float | None = Field(
        default=None, description="Opt-in: min relative primary-metric gain over the champion."
    )
    min_parse_rate: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Opt-in: absolute parse-rate floor."
    )


DEFAULT_MAX_GROUPS = 128
"""Groups one run trains on when the policy does not say: one round of the quality benchmark's
headline size (128 prompts × G). Without a cap a round's work grows with the backlog that piled
up while the previous round trained, so on a busy service each round takes longer than the last
(measured: 55 groups in 6 min, then 331 groups still training 20 min later)."""


class TrainingSpec(BaseModel):
    """Learner knobs stored on the policy; the learner validates the full config itself."""

    model_config = ConfigDict(extra="allow")
    algorithm: Literal["oapl", "grpo"] = "oapl"
    min_groups: int = Field(
        default=16,
        ge=1,
        description="Data trigger: non-zero-variance groups "
        "since the last run needed before a scheduled run starts.",
    )
    max_groups: int | None = Field(
        default=DEFAULT_MAX_GROUPS,
        ge=1,
        description="Cap on the rollout groups one run trains on (oldest first; the rest wait "
        "for the next round). null: every trainable group, however many.",
    )
    processes: int = Field(
        default=1,
        ge=1,
        description="Data-parallel learner processes per training run: 1 trains inside the train "
        "job's process; N > 1 runs the round under `torchrun --nproc_per_node N` (at most one "
        "per CPU of the machine that trains).",
    )


def _check_cron(value: str | None) -> str | None:
    if value is not None and not croniter.is_valid(value):
        raise ValueError(f"{value!r} is not a valid crontab expression")
    return value


class PolicyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=POLICY_NAME, description="Lowercase slug; globally unique.")
    base_model: str | None = Field(
        default=None,
        max_length=1024,
        description="Path of the base model; default: the bundled tiny model.",
    )
    grader: GraderSpec = Field(default_factory=GraderSpec)
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    group_size: int = Field(default=8, ge=1, le=256)
    schedule: str | None = Field(
        default=None, max_length=128, description="Crontab, e.g. '0 * * * *'."
    )
    gate: GateSpec = Field(default_factory=GateSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    redaction_enabled: bool = True

    _cron = field_validator("schedule")(_check_cron)


class PolicyUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: GraderSpec | None = None
    sampling: SamplingSpec | None = None
    group_size: int | None = Field(default=None, ge=1, le=256)
    schedule: str | None = Field(default=None, max_length=128)
    gate: GateSpec | None = None
    training: TrainingSpec | None = None
    redaction_enabled: bool | None = None

    _cron = field_validator("schedule")(_check_cron)


class PolicyOut(BaseModel):
    id: int
    name: str
    tenant: str
    base_model: str
    grader: dict[str, Any]
    sampling: dict[str, Any]
    group_size: int
    schedule: str | None
    gate: dict[str, Any]
    training: dict[str, Any]
    redaction_enabled: bool
    serving_snapshot_id: int | None
    serving_snapshot: str | None
    created_at: datetime
    updated_at: datetime
