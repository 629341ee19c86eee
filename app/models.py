"""The data model: every entity a human may want to audit is a row.

Enums are stored as strings (portable between SQLite and Postgres); allowed state transitions live
next to the enum so no code compares status strings ad hoc.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    true,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db import Base, BigIntId, JSONType, UtcDateTime, utcnow
from app.traces.redaction import RedactionMode


def _enum(cls: type[enum.Enum]) -> Enum:
    return Enum(
        cls,
        native_enum=False,
        length=32,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


def _ts(**kw: Any) -> Any:
    return mapped_column(UtcDateTime(), **kw)


class Split(enum.StrEnum):
    train = "train"
    heldout = "heldout"


class OutcomeSource(enum.StrEnum):
    api = "api"
    annotation = "annotation"
    eval = "eval"


class OutcomeOrigin(enum.StrEnum):
    """How an outcome arrived; it decides precedence (``app.traces.outcomes``)."""

    inline = "inline"  # with its trace (POST /v1/traces, the proxy)
    feedback = "feedback"  # afterwards (POST /v1/feedback, Langfuse scores)


class SnapshotStatus(enum.StrEnum):
    candidate = "candidate"
    evaluated = "evaluated"
    awaiting_approval = "awaiting_approval"
    approved = "approved"
    deploying = "deploying"
    serving = "serving"
    retired = "retired"
    rejected = "rejected"
    failed = "failed"
    superseded = "superseded"
    """The serving snapshot changed under a candidate before it had a verdict."""
    rolled_back = "rolled_back"
    """Taken out of serving by a rollback: never served again without a fresh evaluation."""


SNAPSHOT_TRANSITIONS: dict[SnapshotStatus, frozenset[SnapshotStatus]] = {
    SnapshotStatus.candidate: frozenset(
        {SnapshotStatus.evaluated, SnapshotStatus.failed, SnapshotStatus.superseded}
    ),
    SnapshotStatus.evaluated: frozenset(
        {SnapshotStatus.awaiting_approval, SnapshotStatus.rejected, SnapshotStatus.failed}
    ),
    SnapshotStatus.awaiting_approval: frozenset(
        {SnapshotStatus.approved, SnapshotStatus.rejected}
    ),
    SnapshotStatus.approved: frozenset({SnapshotStatus.deploying, SnapshotStatus.failed}),
    SnapshotStatus.deploying: frozenset({SnapshotStatus.serving, SnapshotStatus.failed}),
    SnapshotStatus.serving: frozenset({SnapshotStatus.retired, SnapshotStatus.rolled_back}),
    # A retired snapshot comes back only through rollback, which redeploys it.
    SnapshotStatus.retired: frozenset({SnapshotStatus.deploying}),
    SnapshotStatus.rejected: frozenset(),
    SnapshotStatus.failed: frozenset(),
    SnapshotStatus.superseded: frozenset(),
    SnapshotStatus.rolled_back: frozenset(),
}


class GroupStatus(enum.StrEnum):
    pending = "pending"
    generated = "generated"
    graded = "graded"
    failed = "failed"


class RolloutStatus(enum.StrEnum):
    generated = "generated"
    graded = "graded"
    failed = "failed"


class RunStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"  # attempts exhausted
    retrying = "retrying"


class JobKind(enum.StrEnum):
    rollout = "rollout"
    grade = "grade"
    train = "train"
    eval = "eval"
    promote = "promote"


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[datetime] = _ts(default=utcnow)
    revoked_at: Mapped[datetime | None] = _ts(nullable=True)
    last_used_at: Mapped[datetime | None] = _ts(nullable=True)


class Tenant(Base):
    """Settings that belong to a tenant rather than to one policy. A tenant exists as soon as
    one of its API keys does; without a row it has the defaults, and the row is written the
    first time an admin changes a setting."""

    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    redaction_mode: Mapped[RedactionMode] = mapped_column(
        _enum(RedactionMode), default=RedactionMode.mask
    )
    created_at: Mapped[datetime] = _ts(default=utcnow)
    updated_at: Mapped[datetime] = _ts(default=utcnow, onupdate=utcnow)


class Policy(Base):
    __tablename__ = "policies"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    # Globally unique: it is the `model` a client names and the prefix of vLLM adapter names.
    name: Mapped[str] = mapped_column(String(64), unique=True)
    base_model: Mapped[str] = mapped_column(String(1024))
    grader_spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    sampling_params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    group_size: Mapped[int] = mapped_column(Integer, default=8)
    schedule: Mapped[str | None] = mapped_column(String(128), nullable=True)
    gate: Mapped[dict[str, Any]] = mapped_column(default=dict)
    training_config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    redaction_enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    serving_snapshot_id: Mapped[int | None] = mapped_column(
        ForeignKey("snapshots.id", use_alter=True, ondelete="SET NULL"), nullable=True
    )
    created_at: Mapped[datetime] = _ts(default=utcnow)
    updated_at: Mapped[datetime] = _ts(default=utcnow, onupdate=utcnow)

    serving_snapshot: Mapped[Snapshot | None] = relationship(
        foreign_keys=[serving_snapshot_id], post_update=True
    )


class Snapshot(Base):
    __tablename__ = "snapshots"
    __table_args__ = (UniqueConstraint("policy_id", "version"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    policy_id: Mapped[int] = mapped_column(ForeignKey("policies.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("snapshots.id", ondelete="SET NULL"), nullable=True
    )
    # v0 is the bare base model: no adapter.
    adapter_path: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    adapter_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    served_name: Mapped[str] = mapped_column(String(128), unique=True)
    status: Mapped[SnapshotStatus] = mapped_column(_enum(SnapshotStatus), index=True)
    status_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    training_run_id: Mapped[int | None] = mapped_column(
        ForeignKey("training_runs.id", use_alter=True, ondelete="SET NULL"), nullable=True
    )
    manifest: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = _ts(default=utcnow)
    updated_at: Mapped[datetime] = _ts(default=utcnow, onupdate=utcnow)

    policy: Mapped[Policy] = relationship(foreign_keys=[policy_id])


class Trace(Base):
    __tablename__ = "traces"
    __table_args__ = (
        UniqueConstraint("tenant", "external_id"),
        Index("ix_traces_policy_split_id", "policy_id", "split", "id"),
        Index("ix_traces_tenant_created", "tenant", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    external_id: Mapped[str] = mapped_column(String(256))
    policy_id: Mapped[int] = mapped_column(ForeignKey("policies.id", ondelete="CASCADE"))
    messages: Mapped[list[Any]] = mapped_column()
    # The response's text; the full message (tool calls, refusal) when it was sent as one.
    response: Mapped[str] = mapped_column(Text)
    response_message: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    # tools, tool_choice, parallel_tool_calls, sampling_params: only the keys the client sent.
    request: Mapped[dict[str, Any]] = mapped_column(default=dict)
    finish_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    usage: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    tags: Mapped[list[Any] | None] = mapped_column(JSONType, nullable=True)
    user_id: Mapped[str | None] = mapped_column(String(256), nullable=True)
    session_id: Mapped[str | None] = mapped_column(String(256), nullable=True)
    trainable: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    untrainable_reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model: Mapped[str | None] = mapped_column(String(256), nullable=True)
    snapshot_id: Mapped[int | None] = mapped_column(
        ForeignKey("snapshots.id", ondelete="SET NULL"), nullable=True
    )
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    split: Mapped[Split] = mapped_column(_enum(Split))
    redactions: Mapped[dict[str, Any]] = mapped_column(default=dict)
    content_hash: Mapped[str] = mapped_column(String(64))
    occurred_at: Mapped[datetime | None] = _ts(nullable=True)
    created_at: Mapped[datetime] = _ts(default=utcnow)

    outcomes: Mapped[list[Outcome]] = relationship(
        back_populates="trace", cascade="all, delete-orphan", passive_deletes=True
    )


class Outcome(Base):
    """A label or signal for a trace. Kept even when the trace has not arrived yet (joined on
    ingest by (tenant, trace_external_id))."""

    __tablename__ = "outcomes"
    __table_args__ = (UniqueConstraint("tenant", "trace_external_id", "name"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    trace_external_id: Mapped[str] = mapped_column(String(256))
    trace_id: Mapped[int | None] = mapped_column(
        ForeignKey("traces.id", ondelete="CASCADE"), nullable=True, index=True
    )
    name: Mapped[str] = mapped_column(String(128))
    value: Mapped[Any] = mapped_column(JSONType)
    source: Mapped[OutcomeSource] = mapped_column(_enum(OutcomeSource))
    origin: Mapped[OutcomeOrigin] = mapped_column(
        _enum(OutcomeOrigin), default=OutcomeOrigin.feedback, server_default="feedback"
    )
    labelled_at: Mapped[datetime] = _ts(default=utcnow)
    created_at: Mapped[datetime] = _ts(default=utcnow)
    updated_at: Mapped[datetime] = _ts(default=utcnow, onupdate=utcnow)

    trace: Mapped[Trace | None] = relationship(back_populates="outcomes")


class RolloutGroup(Base):
    __tablename__ = "rollout_groups"
    __table_args__ = (UniqueConstraint("trace_id", "snapshot_id"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    trace_id: Mapped[int] = mapped_column(ForeignKey("traces.id", ondelete="CASCADE"))
    snapshot_id: Mapped[int] = mapped_column(
        ForeignKey("snapshots.id", ondelete="CASCADE"), index=True
    )
    group_size: Mapped[int] = mapped_column(Integer)
    status: Mapped[GroupStatus] = mapped_column(_enum(GroupStatus), index=True)
    sampling_params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    grader_version: Mapped[str | None] = mapped_column(String(128), nullable=True)
    reward_mean: Mapped[float | None] = mapped_column(Float, nullable=True)
    reward_std: Mapped[float | None] = mapped_column(Float, nullable=True)
    zero_variance: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    value_estimate: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = _ts(default=utcnow)
    updated_at: Mapped[datetime] = _ts(default=utcnow, onupdate=utcnow)

    rollouts: Mapped[list[Rollout]] = relationship(
        back_populates="group",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="Rollout.index",
    )


class Rollout(Base):
    __tablename__ = "rollouts"
    __table_args__ = (UniqueConstraint("group_id", "index"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("rollout_groups.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    token_ids: Mapped[list[Any]] = mapped_column()
    token_logprobs: Mapped[list[Any]] = mapped_column()
    behaviour_logprob_sum: Mapped[float] = mapped_column(Float)
    finish_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    status: Mapped[RolloutStatus] = mapped_column(_enum(RolloutStatus))
    reward: Mapped[float | None] = mapped_column(Float, nullable=True)
    parse_ok: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    grader_version: Mapped[str | None] = mapped_column(String(128), nullable=True)
    grade_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = _ts(default=utcnow)

    group: Mapped[RolloutGroup] = relationship(back_populates="rollouts")


training_run_groups = Table(
    "training_run_groups",
    Base.metadata,
    Column(
        "training_run_id",
        ForeignKey("training_runs.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column(
        "group_id",
        ForeignKey("rollout_groups.id", ondelete="CASCADE"),
        primary_key=True,
        index=True,
    ),
)


class TrainingRun(Base):
    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    policy_id: Mapped[int] = mapped_column(
        ForeignKey("policies.id", ondelete="CASCADE"), index=True
    )
    algorithm: Mapped[str] = mapped_column(String(32))
    status: Mapped[RunStatus] = mapped_column(_enum(RunStatus), index=True)
    trigger: Mapped[str] = mapped_column(String(32), default="manual")
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    parent_snapshot_id: Mapped[int | None] = mapped_column(
        ForeignKey("snapshots.id", ondelete="SET NULL"), nullable=True
    )
    output_snapshot_id: Mapped[int | None] = mapped_column(
        ForeignKey("snapshots.id", ondelete="SET NULL"), nullable=True
    )
    # Deleted traces are recorded here so lineage survives the deletion of their groups.
    group_ids_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    trace_ids: Mapped[list[Any]] = mapped_column(default=list)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = _ts(default=utcnow)
    started_at: Mapped[datetime | None] = _ts(nullable=True)
    finished_at: Mapped[datetime | None] = _ts(nullable=True)
    heartbeat_at: Mapped[datetime | None] = _ts(nullable=True)

    groups: Mapped[list[RolloutGroup]] = relationship(secondary=training_run_groups)


class Evaluation(Base):
    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    snapshot_id: Mapped[int] = mapped_column(
        ForeignKey("snapshots.id", ondelete="CASCADE"), index=True
    )
    champion_snapshot_id: Mapped[int | None] = mapped_column(
        ForeignKey("snapshots.id", ondelete="SET NULL"), nullable=True
    )
    dataset: Mapped[str] = mapped_column(String(128))
    n: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    comparison: Mapped[dict[str, Any]] = mapped_column(default=dict)
    breakdown: Mapped[dict[str, Any]] = mapped_column(default=dict)
    examples: Mapped[list[Any]] = mapped_column(default=list)
    gate_passed: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    gate_reasons: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[datetime] = _ts(default=utcnow)


class AuditEvent(Base):
    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_entity", "entity_type", "entity_id"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64), index=True)
    entity_type: Mapped[str] = mapped_column(String(64))
    entity_id: Mapped[str] = mapped_column(String(64))
    before: Mapped[dict[str, Any]] = mapped_column(default=dict)
    after: Mapped[dict[str, Any]] = mapped_column(default=dict)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = _ts(default=utcnow, index=True)


class Job(Base):
    """Postgres is the job truth; Celery only delivers. One row per unit of work."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_lease", "status", "lease_expires_at"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    kind: Mapped[JobKind] = mapped_column(_enum(JobKind))
    # Idempotency: the same unit of work (e.g. "rollout:trace=12:snapshot=3") is one row.
    key: Mapped[str] = mapped_column(String(256), unique=True)
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus), index=True)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    # A failed job's key is planned again (attempts reset) up to ``job_max_replans`` times, each
    # after a growing backoff: the key names the work, not its fate.
    replans: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_expires_at: Mapped[datetime | None] = _ts(nullable=True)
    heartbeat_at: Mapped[datetime | None] = _ts(nullable=True)
    # Outbox: None until the message was handed to the broker; the dispatcher retries the rest.
    dispatched_at: Mapped[datetime | None] = _ts(nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = _ts(default=utcnow)
    updated_at: Mapped[datetime] = _ts(default=utcnow, onupdate=utcnow)


class LangfuseObservation(Base):
    """A Langfuse trace or generation as it arrives in pieces (create, then updates, possibly in
    different batches): staged here until a generation has its input and output and becomes a
    trace."""

    __tablename__ = "langfuse_observations"
    __table_args__ = (UniqueConstraint("tenant", "kind", "lf_id"),
                      Index("ix_langfuse_observations_trace", "tenant", "lf_trace_id"))

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))  # "trace" | "generation"
    lf_id: Mapped[str] = mapped_column(String(256))
    lf_trace_id: Mapped[str | None] = mapped_column(String(256), nullable=True)
    body: Mapped[dict[str, Any]] = mapped_column(default=dict)
    trace_id: Mapped[int | None] = mapped_column(
        ForeignKey("traces.id", ondelete="SET NULL"), nullable=True
    )
    created_at: Mapped[datetime] = _ts(default=utcnow)
    updated_at: Mapped[datetime] = _ts(default=utcnow, onupdate=utcnow)


class CacheGeneration(Base):
    """A counter per process cache (``app.cache``), bumped by database triggers in the same
    transaction as any change to the rows that cache holds, so every process sees a change on
    its next request however it was made (API, CLI, a worker, plain SQL)."""

    __tablename__ = "cache_generations"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    generation: Mapped[int] = mapped_column(BigInteger)

