from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    field_validator,
)

from app.models import OutcomeSource, Split

OutcomeValue = StrictBool | StrictInt | StrictFloat | Annotated[str, Field(max_length=256)]


class ChatMessage(BaseModel):
    """One OpenAI-format chat message (text content only)."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=200_000)
    name: str | None = Field(default=None, max_length=64)


class InlineOutcome(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    value: OutcomeValue
    source: OutcomeSource = OutcomeSource.api


class TraceIn(BaseModel):
    """A production trace: what the deployed model was asked and what it answered."""

    model_config = ConfigDict(extra="forbid")
    external_id: str = Field(
        min_length=1, max_length=256, description="Client idempotency key, unique per tenant."
    )
    policy: str = Field(min_length=1, max_length=64, description="Name of the policy.")
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    response: str = Field(max_length=200_000, description="What the deployed model answered.")
    model: str | None = Field(
        default=None, max_length=256, description="Served snapshot name, e.g. `clinical-v3`."
    )
    metadata: dict[str, Any] = Field(default_factory=dict)
    outcome: InlineOutcome | None = None
    occurred_at: datetime | None = None

    @field_validator("external_id")
    @classmethod
    def _no_control_chars(cls, v: str) -> str:
        if any(ord(c) < 32 for c in v):
            raise ValueError("external_id must not contain control characters")
        return v


class TraceBatchIn(BaseModel):
    """A batch of traces; each item is validated on its own so one bad item cannot sink the rest.
    Items follow the `TraceIn` schema."""

    model_config = ConfigDict(extra="forbid")
    traces: list[dict[str, Any]] = Field(min_length=1)


class ItemStatus(enum.StrEnum):
    created = "created"
    duplicate = "duplicate"
    conflict = "conflict"
    invalid = "invalid"


class ItemResult(BaseModel):
    index: int
    external_id: str | None
    status: ItemStatus
    id: int | None = None
    split: Split | None = None
    error: dict[str, Any] | None = Field(
        default=None, description="problem+json body for conflict/invalid items"
    )


class BatchResult(BaseModel):
    results: list[ItemResult]
    counts: dict[str, int]


class OutcomeOut(BaseModel):
    name: str
    value: Any
    source: OutcomeSource
    updated_at: datetime


class TraceOut(BaseModel):
    id: int
    external_id: str
    policy: str
    messages: list[dict[str, Any]]
    response: str
    model: str | None
    snapshot_id: int | None
    metadata: dict[str, Any]
    split: Split
    redactions: dict[str, Any]
    outcomes: list[OutcomeOut]
    occurred_at: datetime | None
    created_at: datetime


class TracePage(BaseModel):
    items: list[TraceOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null at end.")


class DeletedTrace(BaseModel):
    id: int
    deleted: bool
    rollouts_deleted: int
    training_run_ids: list[int] = Field(description="Runs whose adapters were trained on it.")
