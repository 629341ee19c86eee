"""The request's session (``app.dependencies.get_session``): committed when the route
succeeds, rolled back when it fails, and its connection always back in the pool — also when the
request is cancelled while the session is being ended."""

from __future__ import annotations

import uuid

import anyio
import pytest
from sqlalchemy import func, select
from sqlalchemy.pool import QueuePool

from app.db import Database
from app.dependencies import get_session
from app.models import Policy


def _policy(name: str) -> Policy:
    return Policy(tenant="t-session", name=name, base_model="tiny")


def _checked_out(database: Database) -> int:
    pool = database.engine.pool
    assert isinstance(pool, QueuePool)  # both databases' engines pool connections
    return pool.checkedout()


def _stored(database: Database, name: str) -> int:
    with database.session() as s:
        return s.scalar(select(func.count()).select_from(Policy).where(Policy.name == name)) or 0


async def _run_route(fail: bool, name: str) -> None:
    dependency = get_session()
    session = await dependency.__anext__()
    session.add(_policy(name))
    session.flush()  # the transaction holds a connection now
    if fail:
        with pytest.raises(RuntimeError):
            await dependency.athrow(RuntimeError("the route failed"))
    else:
        with pytest.raises(StopAsyncIteration):
            await dependency.__anext__()


def test_a_route_that_succeeds_has_its_writes_committed(database: Database) -> None:
    name = f"ok-{uuid.uuid4().hex[:8]}"
    anyio.run(_run_route, False, name)
    assert _stored(database, name) == 1
    assert _checked_out(database) == 0


def test_a_route_that_fails_has_its_writes_rolled_back(database: Database) -> None:
    name = f"failed-{uuid.uuid4().hex[:8]}"
    anyio.run(_run_route, True, name)
    assert _stored(database, name) == 0
    assert _checked_out(database) == 0


def test_a_session_without_a_transaction_ends_without_the_threadpool(
    database: Database, monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_thread(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a thread hop to end a session that holds nothing")

    monkeypatch.setattr(anyio.to_thread, "run_sync", no_thread)

    async def route() -> None:
        dependency = get_session()
        session = await dependency.__anext__()
        session.execute(select(func.count()).select_from(Policy))
        session.commit()  # as auth and the group writer's requests do
        with pytest.raises(StopAsyncIteration):
            await dependency.__anext__()

    anyio.run(route)
    assert _checked_out(database) == 0


def test_a_request_cancelled_while_its_session_ends_still_returns_the_connection(
    database: Database,
) -> None:
    name = f"cancelled-{uuid.uuid4().hex[:8]}"
    held: list[object] = []  # the session outlives the request, as a leak would

    async def route() -> None:
        dependency = get_session()
        session = await dependency.__anext__()
        held.append(session)
        session.add(_policy(name))
        session.flush()
        with anyio.CancelScope() as scope:
            scope.cancel()  # the client went away: everything awaited here is cancelled
            with pytest.raises(anyio.get_cancelled_exc_class()):
                await dependency.athrow(anyio.get_cancelled_exc_class()())

    anyio.run(route)
    assert _stored(database, name) == 0
    assert _checked_out(database) == 0
