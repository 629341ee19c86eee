"""The tenant's settings as the API shows and takes them."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from app.traces.redaction import RedactionMode


class TenantOut(BaseModel):
    name: str
    redaction_mode: RedactionMode = Field(
        description="`mask`: PII becomes `[KIND]`; `hash`: `[KIND:<12 hex>]`, the same token for "
        "the same value across this tenant's traces; `off`: stored as sent."
    )
    updated_at: datetime | None = Field(description="None while the tenant has the defaults.")


class TenantUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    redaction_mode: RedactionMode | None = None
