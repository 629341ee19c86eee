from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Body, Depends, Query
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.auth.service import Principal, Scope
from app.dependencies import SessionDep, require
from app.models import Split
from app.problems import problem_json
from app.settings import get_settings
from app.traces import group_commit, service
from app.traces.schemas import (
    BatchResult,
    DeletedTrace,
    ItemResult,
    ItemStatus,
    TraceBatchIn,
    TraceIn,
    TraceOut,
    TracePage,
)

router = APIRouter(prefix="/traces", tags=["traces"])

_SINGLE_STATUS = {ItemStatus.created: 201, ItemStatus.duplicate: 200}


@router.post(
    "",
    summary="Ingest one trace or a batch",
    description="Idempotent on (tenant, external_id). One trace answers 201 (created), 200 "
    "(duplicate), 409 (same external_id, other content) or 422. A batch `{\"traces\": [...]}` "
    "answers 207 with one result per item; valid items are committed even when others fail. "
    "Messages, tools and the response follow the OpenAI chat format. Media is stored only by "
    "reference: image parts by http(s) URL and file parts by `file_id` are kept (the trace is "
    "then not trainable); inline `data:` images, `input_audio` and `file_data` are refused with "
    "422 `inline-media-unsupported`.",
    responses={
        200: {"model": ItemResult, "description": "Duplicate of a stored trace"},
        201: {"model": ItemResult, "description": "Stored"},
        207: {"model": BatchResult, "description": "Batch: per-item results"},
        409: {"description": "Conflicting duplicate"},
        413: {"description": "Batch too large"},
        422: {"description": "Invalid trace or unknown policy"},
    },
)
async def ingest_traces(
    session: SessionDep,
    body: TraceIn | TraceBatchIn = Body(...),
    principal: Principal = Depends(require(Scope.ingest)),
) -> JSONResponse:
    settings = get_settings()
    if isinstance(body, TraceBatchIn):
        batch = await run_in_threadpool(service.ingest, session, principal, body.traces,
                                        settings)
        return JSONResponse(batch.model_dump(mode="json"), status_code=207)
    # Python mode: a JSON-mode dump would replace a lone surrogate in a metadata key with U+FFFD
    # and hide it from the string check.
    raw: dict[str, Any] = body.model_dump(mode="python", exclude_unset=True)
    result = await group_commit.ingest_one(session, principal, raw, settings)
    if result.status in _SINGLE_STATUS:
        return JSONResponse(result.model_dump(mode="json"),
                            status_code=_SINGLE_STATUS[result.status])
    assert result.error is not None  # every status without a body of its own carries one
    return problem_json(result.error)


@router.get("", response_model=TracePage, summary="List traces (cursor pagination)")
def list_traces(
    session: SessionDep,
    policy: str | None = Query(default=None, max_length=64),
    external_id: str | None = Query(default=None, max_length=256,
                                    description="Only the trace with this external_id."),
    split: Split | None = None,
    has_outcome: bool | None = None,
    since: datetime | None = Query(default=None, description="created_at ≥ since"),
    until: datetime | None = Query(default=None, description="created_at < until"),
    cursor: str | None = Query(default=None, max_length=200),
    limit: int = Query(default=50, ge=1, le=1000),
    principal: Principal = Depends(require(Scope.read)),
) -> TracePage:
    return service.list_traces(
        session, principal.tenant, policy=policy, external_id=external_id, split=split,
        has_outcome=has_outcome,
        since=since, until=until, cursor=cursor, limit=limit,
    )


@router.get("/{trace_id}", response_model=TraceOut)
def get_trace(
    session: SessionDep,
    trace_id: int,
    principal: Principal = Depends(require(Scope.read)),
) -> TraceOut:
    return service.get_trace(session, principal.tenant, trace_id)


@router.delete("/{trace_id}", response_model=DeletedTrace,
               summary="Delete a trace and its rollouts (recorded in the audit log)")
def delete_trace(
    session: SessionDep,
    trace_id: int,
    reason: str | None = Query(default=None, max_length=500),
    principal: Principal = Depends(require(Scope.admin)),
) -> DeletedTrace:
    return service.delete_trace(session, principal, trace_id, reason)
