from __future__ import annotations

import email.message
import time
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Send
from starlette.types import Scope as AsgiScope

from app.apidocs import request_body
from app.auth.service import Principal, Scope
from app.db import Database, get_database
from app.dependencies import SessionDep, rate_limiter, require
from app.errors import RateLimited
from app.limits import SECURITY_HEADERS, body_marks, body_problem, parse_json
from app.models import Split
from app.observability import observe_request
from app.problems import problem_json
from app.settings import Settings, get_settings
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


# ------------------------------------------------------------------ the cached single-trace path
#
# Single-trace POSTs answered from the process caches, in front of the framework.
#
# ``POST /v1/traces`` with one trace is the service's hottest request. Through FastAPI it costs
# two threadpool hand-offs (auth, then admission), a counters round trip, dependency solving,
# the framework's request and response objects and eight middleware layers (ours and the
# framework's): ~2 ms of CPU a request on the 2-core host of ``benchmarks/ingest.py``, where a
# bare ASGI answer in the same process costs ~0.08 ms. Here the request is admitted on the event
# loop from what the process already holds (the key, the policy, the tenant's redaction mode,
# the served snapshots: ``app.cache.cached_only``) and its row joins the group writer, which
# checks, in the transaction that writes it, that none of those caches has moved since
# (``app.traces.group_commit``). A key revoked a moment ago is therefore still refused on its
# very next request.
#
# It wraps the whole middleware stack (``app.main``) and does for its own answers what the
# layers it skips would: the body's size and shape checks (``app.limits.body_problem``: a body
# they would refuse is handed over, and refused there), the security headers and the request
# metrics, filed under the route's template.
#
# Anything else is handed to the application unchanged, with the body it already read:
# batches, a query string, bodies over ``LARGEST_BODY``, other content types, unknown or revoked
# keys, keys without the ``ingest`` scope, a rate limit reached, a cache miss, every refused or
# invalid trace, a database error, and a row whose caches moved before its commit. What the
# group writer decides (stored, duplicate, conflict) is answered as the route answers it
# (``single_trace_answer``).
#
# A request handed over after its rate-limit token was taken (its caches moved before the
# commit, or the database failed) gives that token back first (``RateLimiter.refund``), and the
# route takes its own: one request, one token.

CACHED_PATH = "/v1/traces"
LARGEST_BODY = 64 * 1024
"""Larger single traces go to the route: admission runs on the event loop here, and a trace of
megabytes would hold every other request of the process while it is validated and redacted
(the route admits in the threadpool)."""


class CachedSingleTraceIngest:
    """ASGI wrapper in front of the whole application, its middleware included. ``max_bytes``
    and ``max_depth``: the body limits the application applies (``BodyLimitMiddleware``);
    ``route``: the route its answers are filed under in the request metrics, as if the route
    had served them."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_depth: int, route: Any) -> None:
        self.app = app
        self.largest = min(LARGEST_BODY, max_bytes)
        self.max_depth = max_depth
        self.route = route

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] != "POST" or scope.get("query_string")
                or scope["path"] != scope.get("root_path", "") + CACHED_PATH):
            await self.app(scope, receive, send)
            return
        raw_key = _bearer_key(scope)
        settings, database = get_settings(), get_database()
        if raw_key is None or not group_commit.grouped(settings, database):
            await self.app(scope, receive, send)
            return
        start, largest = time.perf_counter(), self.largest
        messages: list[Message] = []
        size, more = 0, True
        while more and size <= largest:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            more = message["type"] == "http.request" and message.get("more_body", False)
        replay = _replaying(messages, receive)
        # Over the size admitted here (the application reads the rest, under its own limit),
        # or the client went away mid-body.
        if size > largest or messages[-1]["type"] != "http.request":
            await self.app(scope, replay, send)
            return
        body = b"".join(m.get("body", b"") for m in messages)
        try:
            answer = await self._answer(scope, raw_key, body, settings, database,
                                        self.max_depth)
        except Exception:
            # Nothing acknowledged: the route tries once more and answers as it would (503 +
            # Retry-After while the database is gone; anything else fails again inside the
            # error handling that logs it). A repeat of a row that did commit is a duplicate,
            # so trying again is safe.
            answer = None
        if answer is None:
            await self.app(scope, replay, send)
            return
        await send({"type": "http.response.start", "status": answer.status_code,
                    "headers": answer.raw_headers + SECURITY_HEADERS})
        await send({"type": "http.response.body", "body": answer.body})
        scope["route"] = self.route
        observe_request(scope, answer.status_code, start)

    @staticmethod
    async def _answer(scope: AsgiScope, raw_key: str, body: bytes, settings: Settings,
                      database: Database, max_depth: int) -> Response | None:
        """The answer for a trace the group writer judged, admitted from the caches, or None
        for the application to answer."""
        if b'"traces"' in body:
            # A batch, most likely: the route parses it, so it is not parsed twice (a single
            # trace that merely says "traces" somewhere goes there too).
            return None
        marks = body_marks(body)
        if body_problem(scope["path"], b"application/json", body, max_depth,
                        marks) is not None:
            return None
        try:
            raw = parse_json(body, marks)
        except ValueError:
            return None
        if not isinstance(raw, dict):
            return None
        admitted = group_commit.admit_cached(database, raw_key, raw, settings)
        if admitted is None:
            return None
        principal, entry, counters = admitted
        try:
            rate_limiter.check(principal.key_id, settings.rate_limit_per_minute)
        except RateLimited:
            return None
        try:
            result = await group_commit.write_cached(database, entry, counters)
        except BaseException:
            rate_limiter.refund(principal.key_id, settings.rate_limit_per_minute)
            raise
        if result is None:
            # Held back: the route admits it again, and takes its own token.
            rate_limiter.refund(principal.key_id, settings.rate_limit_per_minute)
            return None
        return single_trace_answer(result)


def _bearer_key(scope: AsgiScope) -> str | None:
    """The key of an ``Authorization: Bearer`` header on a JSON body, else None."""
    authorization = content_type = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value
        elif name == b"content-type":
            content_type = value
    if authorization is None or content_type is None:
        return None
    if content_type.split(b";", 1)[0].strip().lower() != b"application/json":
        return None
    scheme, _, key = authorization.partition(b" ")
    key = key.strip()
    if scheme.lower() != b"bearer" or not key:
        return None
    try:
        return key.decode("ascii")
    except UnicodeDecodeError:
        return None


def _replaying(messages: list[Message], receive: Receive) -> Receive:
    """``receive`` that gives ``messages`` again first."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
