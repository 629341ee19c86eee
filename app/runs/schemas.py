from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class RunCreate(BaseModel):
    """Start a training run by hand. ``config`` overrides the policy's training config for this
    run only (trainer keys such as ``epochs``, ``groups_per_step``, ``lr``, ``beta2``)."""

    model_config = ConfigDict(extra="forbid")
    algorithm: Literal["oapl", "grpo"] | None = Field(
        default=None, description="Default: the policy's training algorithm."
    )
    config: dict[str, Any] = Field(default_factory=dict, description="Trainer overrides.")


class RunOut(BaseModel):
    id: int
    policy: str
    algorithm: str
    status: str
    trigger: str
    progress: float = Field(description="0..1, updated after every optimizer step.")
    config: dict[str, Any]
    metrics: dict[str, Any]
    error: str | None
    parent_snapshot: str | None
    output_snapshot: str | None
    groups_used: int
    optimizer_steps: int | None = Field(
        default=None, description="AdamW steps the round took (epochs × ⌈groups / groups_per_step⌉).")
    epochs: float | None = Field(
        default=None, description="Passes over the groups (fractional if the guard stopped it).")
    job_status: str | None = Field(description="The train job: queued/running/retrying/…")
    job_attempts: int | None
    created_by: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None


class RunPage(BaseModel):
    items: list[RunOut]
