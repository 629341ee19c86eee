from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.models import OutcomeSource
from app.traces.schemas import OutcomeValue


class FeedbackItem(BaseModel):
    """An outcome for a trace, named by its external_id (it may not have arrived yet) or id."""

    model_config = ConfigDict(extra="forbid")
    trace_external_id: str | None = Field(default=None, min_length=1, max_length=256)
    trace_id: int | None = Field(default=None, ge=1)
    name: str = Field(min_length=1, max_length=128)
    value: OutcomeValue
    source: OutcomeSource = OutcomeSource.api
    labelled_at: datetime | None = Field(
        default=None,
        description="When the label was made (default: when it arrives; naive times are UTC, "
        "future times count as now). Of two feedback labels for the same trace and name, the "
        "later one wins, whatever order they arrive in; feedback outranks the trace's inline "
        "outcome.",
    )

    @model_validator(mode="after")
    def _one_reference(self) -> FeedbackItem:
        if (self.trace_external_id is None) == (self.trace_id is None):
            raise ValueError("give exactly one of trace_external_id or trace_id")
        return self


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    outcomes: list[dict[str, Any]] = Field(
        min_length=1, description="Items follow the `FeedbackItem` schema; each is validated alone."
    )


class FeedbackStatus(enum.StrEnum):
    stored = "stored"
    pending_trace = "pending_trace"
    invalid = "invalid"
    not_found = "not_found"
    outranked = "outranked"  # the stored label outranks this one (it is later): kept as is


class FeedbackItemResult(BaseModel):
    index: int
    status: FeedbackStatus
    trace_id: int | None = None
    error: dict[str, Any] | None = None


class FeedbackResult(BaseModel):
    results: list[FeedbackItemResult]
    counts: dict[str, int]
