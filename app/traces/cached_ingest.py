"""Single-trace POSTs answered from the process caches, before the framework.

``POST /v1/traces`` with one trace is the service's hottest request. Through FastAPI it costs
two threadpool hand-offs (auth, then admission), a counters round trip, dependency solving and
the framework's request and response objects: ~2 ms of CPU a request on the 2-core host of
``benchmarks/ingest.py``, where a bare ASGI answer in the same process costs ~0.08 ms. Here the
request is admitted on the event loop from what the process already holds (the key, the
policy, the tenant's redaction mode, the served snapshots: ``app.cache.cached_only``) and its
row joins the group writer, which checks, in the transaction that writes it, that none of
those caches has moved since (``app.traces.group_commit``). A key revoked a moment ago is
therefore still refused on its very next request.

Anything else is handed to the application unchanged, with the body it already read:
batches, bodies over ``LARGEST_BODY``, other content types, unknown or revoked keys, keys without the ``ingest`` scope, a
rate limit reached, a cache miss, every refused or invalid trace, a database error, and a row
whose caches moved before its commit. What the group writer decides (stored, duplicate,
conflict) is answered as the route answers it (``single_trace_answer``).

A request handed over after its rate-limit token was taken (its caches moved before the
commit, or the database failed) takes a second one on the route: a rare double count, in the
caller's disfavour, never a request let through.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.db import get_database
from app.dependencies import rate_limiter
from app.errors import RateLimited
from app.limits import parse_json
from app.settings import get_settings
from app.traces import group_commit
from app.traces.endpoints import single_trace_answer

PATH = "/v1/traces"
LARGEST_BODY = 64 * 1024
"""Larger single traces go to the route: admission runs on the event loop here, and a trace of
megabytes would hold every other request of the process while it is validated and redacted
(the route admits in the threadpool)."""


class CachedSingleTraceIngest:
    """ASGI middleware in front of the application (inside the body limit, which has already
    read and checked the body); ``route`` is the route the request is filed under for the
    request metrics, as if the route had served it."""

    def __init__(self, app: ASGIApp, route: Any) -> None:
        self.app = app
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] != "POST"
                or scope["path"] != scope.get("root_path", "") + PATH):
            await self.app(scope, receive, send)
            return
        raw_key = _bearer_key(scope)
        if raw_key is None:
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        more = True
        while more:
            message = await receive()
            messages.append(message)
            more = message["type"] == "http.request" and message.get("more_body", False)
        replay = _replaying(messages, receive)
        if messages[-1]["type"] != "http.request":  # the client went away mid-body
            await self.app(scope, replay, send)
            return
        answer = await self._answer(raw_key, b"".join(m.get("body", b"") for m in messages))
        if answer is None:
            await self.app(scope, replay, send)
            return
        scope["route"] = self.route
        await answer(scope, replay, send)

    @staticmethod
    async def _answer(raw_key: str, body: bytes) -> Response | None:
        """The answer for a trace the group writer judged, admitted from the caches, or None
        for the route to answer."""
        if len(body) > LARGEST_BODY or b'"traces"' in body:
            # A batch, most likely: the route parses it, so it is not parsed twice (a single
            # trace that merely says "traces" somewhere goes there too).
            return None
        try:
            raw = parse_json(body)
        except ValueError:
            return None
        if not isinstance(raw, dict):
            return None
        settings = get_settings()
        database = get_database()
        if not group_commit.grouped(settings, database):
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
        except Exception:
            # Nothing acknowledged; the route tries once more and answers as it would (503 +
            # Retry-After while the database is gone). A repeat of a row that did commit is a
            # duplicate, so trying again is safe.
            return None
        return None if result is None else single_trace_answer(result)


def _bearer_key(scope: Scope) -> str | None:
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
