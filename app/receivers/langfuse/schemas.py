"""Langfuse's ingestion batch and its 207 answer, as the Langfuse SDKs send and read them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class IngestionEvent(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str = Field(min_length=1, max_length=256)
    type: str = Field(max_length=64)
    timestamp: str | None = None
    body: dict[str, Any]


class IngestionBatch(BaseModel):
    model_config = ConfigDict(extra="allow")
    batch: list[dict[str, Any]] = Field(
        description="Langfuse events (`trace-create`, `generation-create`, `generation-update`, "
        "`span-*`, `event-create`, `score-create`); each is answered on its own."
    )
    metadata: dict[str, Any] | None = None


class IngestionSuccess(BaseModel):
    id: str
    status: int


class IngestionError(BaseModel):
    id: str
    status: int
    message: str
    error: Any = None


class IngestionResult(BaseModel):
    successes: list[IngestionSuccess]
    errors: list[IngestionError]
