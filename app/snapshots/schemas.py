from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.models import SnapshotStatus


class SnapshotOut(BaseModel):
    id: int
    policy: str
    version: int
    served_name: str
    status: SnapshotStatus
    status_reason: str | None
    serving: bool = Field(description="True when the policy's serving pointer is this snapshot.")
    parent_id: int | None
    adapter_path: str | None
    adapter_sha256: str | None
    training_run_id: int | None
    created_at: datetime
    updated_at: datetime


class EvaluateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int | None = Field(
        default=None, ge=1, le=256, description="Samples per prompt; default the policy's G."
    )
    max_items: int = Field(default=200, ge=1, le=100_000, description="Held-out prompts used.")
    breakdown_key: str | None = Field(
        default=None,
        max_length=128,
        description="Metadata key (dotted for nesting, e.g. `case.biomarker`) to break down by.",
    )
    seed: int = Field(default=0, description="Sampling seed, shared by candidate and champion.")
    max_tokens: int | None = Field(default=None, ge=1, le=8192)


class ApproveIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    comment: str | None = Field(default=None, max_length=4000)


class RejectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    comment: str = Field(min_length=1, max_length=4000, description="Why it was rejected.")


class RollbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(default=None, max_length=4000)


class EvalJobOut(BaseModel):
    """The evaluation job a request queued (202): poll the snapshot or its evaluations."""

    job_id: int
    snapshot_id: int
    status: str
    attempts: int
    replans: int
    evaluations_url: str


class EvaluationOut(BaseModel):
    id: int
    snapshot_id: int
    champion_snapshot_id: int | None
    dataset: str
    n: int
    metrics: dict[str, Any]
    comparison: dict[str, Any]
    breakdown: dict[str, Any]
    examples: list[Any]
    gate_passed: bool | None
    gate_reasons: list[Any]
    created_at: datetime


class AuditEventOut(BaseModel):
    id: int
    actor: str
    action: str
    entity_type: str
    entity_id: str
    before: dict[str, Any]
    after: dict[str, Any]
    reason: str | None
    created_at: datetime


class AuditPage(BaseModel):
    items: list[AuditEventOut]
    next_cursor: int | None = Field(description="Pass as `cursor` for the next (older) page.")


class PromotionOut(BaseModel):
    snapshot: SnapshotOut
    promoted: bool = Field(description="False when a promotion step failed (the snapshot is then "
                           "`failed` and the champion still serves).")
    reason: str | None = None
    previous_snapshot_id: int | None = None
    serving_snapshot_id: int | None
