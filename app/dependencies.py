"""FastAPI dependencies: the database session and the caller's principal with a required scope."""

from __future__ import annotations

import base64
import binascii
import math
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Annotated

import anyio
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.auth.service import Principal, Scope, authenticate
from app.cache import per_request, read_request_generations
from app.db import get_database
from app.errors import Forbidden, RateLimited, Unauthorized
from app.settings import get_settings


async def get_session() -> AsyncGenerator[Session, None]:
    """The request's session, committed on success and rolled back on error.

    Routes take it as ``SessionDep`` (``Depends(get_session, scope="function")``): with FastAPI's default
    ("request") scope the commit runs *after* the response has been sent, so a commit that fails
    (database restarting) would leave the client holding a 2xx for data that was never stored.
    Function scope commits before the response goes out and turns a failed commit into a 503.

    Async, so that making the session and ending it cost no thread hop when they need no I/O:
    a session takes a connection only at its first statement, and one whose transaction has
    ended (auth's and the group writer's requests end theirs early) has nothing to commit or
    close. Ending one that still holds a transaction runs in the threadpool, shielded from the
    request's cancellation so the connection always goes back."""
    session = get_database().sessionmaker()
    per_request(session)
    try:
        yield session
    except BaseException:
        await _end(session, session.rollback)
        raise
    else:
        await _end(session, session.commit)
    finally:
        await _end(session, session.close)


async def _end(session: Session, step: Callable[[], None]) -> None:
    if not session.in_transaction():
        step()  # no transaction: nothing to flush, no connection held, no I/O
        return
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(step)


SessionDep = Annotated[Session, Depends(get_session, scope="function")]
"""The one way a route asks for a database session."""

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer tl_…`")


class RateLimiter:
    """A token bucket per API key, refilled continuously at ``per_minute`` tokens a minute."""

    def __init__(self) -> None:
        self._buckets: dict[int, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def check(self, key_id: int, per_minute: int) -> None:
        if per_minute <= 0:
            return
        now = time.monotonic()
        rate = per_minute / 60.0
        with self._lock:
            tokens, last = self._buckets.get(key_id, (float(per_minute), now))
            tokens = min(float(per_minute), tokens + (now - last) * rate)
            if tokens < 1.0:
                self._buckets[key_id] = (tokens, now)
                retry = max(1, math.ceil((1.0 - tokens) / rate))
                raise RateLimited(
                    f"rate limit of {per_minute} requests per minute exceeded",
                    retry_after=retry,
                )
            self._buckets[key_id] = (tokens - 1.0, now)

    def refund(self, key_id: int, per_minute: int) -> None:
        """Give back the token ``check`` took for a request that was then answered elsewhere
        (and checked again there), so one request never costs two."""
        if per_minute <= 0:
            return
        with self._lock:
            held = self._buckets.get(key_id)
            if held is not None:
                self._buckets[key_id] = (min(float(per_minute), held[0] + 1.0), held[1])

    def reset(self) -> None:
        with self._lock:
            self._buckets.clear()


rate_limiter = RateLimiter()


def current_principal(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    session: Session = Depends(get_session, scope="function"),
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("send an API key as `Authorization: Bearer <key>`")
    return _admit(request, session, credentials.credentials, "the API key is unknown or revoked")


def _admit(request: Request, session: Session, raw_key: str | None, refused: str) -> Principal:
    """The key's principal, rate-limited and set on the request; 401 with ``refused`` else."""
    if raw_key:
        read_request_generations(session)
    principal = authenticate(session, raw_key) if raw_key else None
    # End the read-only auth transaction now: its pooled connection must not stay checked out
    # while the request waits for a threadpool slot (200 concurrent requests otherwise held
    # every connection while waiting for threads whose requests waited for a connection).
    session.commit()
    if principal is None:
        raise Unauthorized(refused)
    rate_limiter.check(principal.key_id, get_settings().rate_limit_per_minute)
    request.state.principal = principal
    return principal


def require(scope: Scope) -> Callable[..., Awaitable[Principal]]:
    """A dependency that admits only keys holding ``scope`` (admin holds every scope)."""

    # Async though it awaits nothing: FastAPI runs a sync dependency in the threadpool, a
    # thread hop per request for a set lookup.
    async def _dependency(principal: Principal = Depends(current_principal)) -> Principal:
        if not principal.holds(scope):
            raise Forbidden(f"this route needs the {scope.value!r} scope")
        return principal

    _dependency.required_scope = scope  # type: ignore[attr-defined]
    return _dependency


def _receiver_key(header: str) -> str | None:
    """The API key in a Bearer header, or in a Basic one as Langfuse's SDKs send their key pair:
    public key ``tl_<prefix>``, secret key the whole API key (or the part after the prefix)."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() != "basic":
        return None
    try:
        public, _, secret = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return secret if secret.startswith(f"{public}_") else f"{public}_{secret}"


def receiver_principal(
    request: Request, session: Session = Depends(get_session, scope="function")
) -> Principal:
    """The receivers' auth (Langfuse, OTLP): Bearer or Basic, mapped onto our scoped keys; the
    key needs the ``ingest`` scope."""
    principal = _admit(
        request, session, _receiver_key(request.headers.get("authorization", "")),
        "send `Authorization: Bearer <tracelearn API key>`, or Basic auth with public key "
        "`tl_<prefix>` and the API key as the secret key",
    )
    if not principal.holds(Scope.ingest):
        raise Forbidden("this route needs the 'ingest' scope")
    return principal


receiver_principal.required_scope = Scope.ingest  # type: ignore[attr-defined]
