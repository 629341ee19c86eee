from __future__ import annotations

import email.message
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool

from app.apidocs import request_body
from app.auth.service import Principal, Scope
from app.dependencies import SessionDep, require
from app.limits import parse_json
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
JSON = "application/json"


_body_adapter: TypeAdapter[TraceIn | TraceBatchIn] = TypeAdapter(TraceIn | TraceBatchIn)
_batch_adapter: TypeAdapter[TraceBatchIn] = TypeAdapter(TraceBatchIn)


@router.post(
    "",
    summary="Ingest one trace or a batch",
    description="Idempotent on (tenant, external_id). One trace answers 201 (created), 200 "
    "(duplicate), 409 (same external_id, other content) or 422. A batch `{\"traces\": [...]}` "
    "answers 207 with one result per item; valid items are committed even when others fail. "
    "Messages, tools and the response follow the OpenAI chat format. Media is stored only by "
    "reference: image parts by http(s) URL and file parts by `file_id` are kept (the trace is "
    "then not trainable); inline `data:` images, `input_audio` and `file_data` are refused with "
    "422 `inline-media-unsupported`. Every answer follows the commit that holds the trace.",
    responses={
        200: {"model": ItemResult, "description": "Duplicate of a stored trace"},
        201: {"model": ItemResult, "description": "Stored"},
        207: {"model": BatchResult, "description": "Batch: per-item results"},
        409: {"description": "Conflicting duplicate"},
        413: {"description": "Batch too large"},
        422: {"description": "Invalid trace or unknown policy"},
    },
    openapi_extra=request_body(TraceIn | TraceBatchIn),
)
async def ingest_traces(
    request: Request,
    session: SessionDep,
    principal: Principal = Depends(require(Scope.ingest)),
) -> Response:
    # The body is read here rather than declared: FastAPI would parse it with the stdlib and
    # validate every item against the schema, and the service validates each item again (it
    # must, item by item, for batches). Parsed once with orjson, validated once.
    body = _parse(request.headers.get("content-type"), await request.body())
    settings = get_settings()
    if isinstance(body, dict) and "traces" in body:
        try:
            batch_in = _batch_adapter.validate_python(body)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from exc
        batch = await run_in_threadpool(service.ingest, session, principal, batch_in.traces,
                                        settings)
        return Response(batch.model_dump_json(), status_code=207, media_type=JSON)
    if not isinstance(body, dict):
        try:
            _body_adapter.validate_python(body)  # never valid: says why as FastAPI would
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from exc
    return single_trace_answer(await group_commit.ingest_one(session, principal, body, settings))


def single_trace_answer(result: ItemResult) -> Response:
    """One trace's answer: 201 (stored) or 200 (a duplicate) with its result, else its
    problem."""
    if result.status in _SINGLE_STATUS:
        return Response(result.model_dump_json(), status_code=_SINGLE_STATUS[result.status],
                        media_type=JSON)
    assert result.error is not None  # every status without a body of its own carries one
    return problem_json(result.error)


def _parse(content_type: str | None, body: bytes) -> Any:
    """The JSON body, under the rules FastAPI applies to a declared one (strict content type):
    refused with 422 unless the content type is JSON and the body is JSON."""
    message = email.message.Message()
    message["content-type"] = content_type or ""
    subtype = message.get_content_subtype()
    if not content_type or message.get_content_maintype() != "application" or not (
            subtype == "json" or subtype.endswith("+json")):
        raise RequestValidationError([{"loc": ("body",), "type": "model_attributes_type",
                                       "msg": "send the body as application/json"}])
    try:
        return parse_json(body)
    except ValueError as exc:
        raise RequestValidationError([{"loc": ("body",), "type": "json_invalid",
                                       "msg": f"JSON decode error: {exc}"}]) from exc


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
