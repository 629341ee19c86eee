"""What one single-trace POST costs the database, counted so it cannot grow silently, and the
pool's answer to connections that died under it (no pre-ping: recycle and retry instead)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from app.db import Database
from tests.conftest import PG_ADMIN_DSN


def trace(ext: str, policy: str) -> dict[str, object]:
    return {"external_id": ext, "policy": policy,
            "messages": [{"role": "user", "content": "Patient note"}], "response": "ANSWER: YES"}


class StatementLog:
    """Every statement sent while it is open, as ``"VERB first-80-chars"``, and which of them
    went in a pipeline (psycopg's pipeline mode: one round trip with the statements around
    it). On Postgres it is read at psycopg's ``Cursor.execute`` and ``AsyncCursor.execute``,
    which SQLAlchemy's statements and those the group writer sends on its own connection go
    through; on SQLite, from SQLAlchemy."""

    def __init__(self, database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
        self.engine = database.engine
        self.monkeypatch = monkeypatch
        self.statements: list[str] = []
        self.pipelined: list[bool] = []

    def _record(self, statement: str, pipelined: bool) -> None:
        self.statements.append(statement.split(None, 3)[0].upper() + " " + statement[:80])
        self.pipelined.append(pipelined)

    def _record_event(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self._record(statement, False)

    def __enter__(self) -> StatementLog:
        if self.engine.dialect.name != "postgresql":
            event.listen(self.engine, "before_cursor_execute", self._record_event)
            return self
        execute, execute_async = psycopg.Cursor.execute, psycopg.AsyncCursor.execute

        def recorded(cursor: psycopg.Cursor[Any], query: Any, *args: Any, **kwargs: Any) -> Any:
            self._record(str(query), cursor.connection._pipeline is not None)
            return execute(cursor, query, *args, **kwargs)

        async def recorded_async(cursor: psycopg.AsyncCursor[Any], query: Any, *args: Any,
                                 **kwargs: Any) -> Any:
            self._record(str(query), cursor.connection._pipeline is not None)
            return await execute_async(cursor, query, *args, **kwargs)

        self.monkeypatch.setattr(psycopg.Cursor, "execute", recorded)
        self.monkeypatch.setattr(psycopg.AsyncCursor, "execute", recorded_async)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.engine.dialect.name != "postgresql":
            event.remove(self.engine, "before_cursor_execute", self._record_event)
        self.monkeypatch.undo()


@pytest.fixture
def warm(client: TestClient, admin_headers: dict[str, str], policy_name: str) -> Iterator[None]:
    """The key and the policy have been used once: they are in the process caches."""
    assert client.post("/v1/traces", json=trace("warm", policy_name),
                       headers=admin_headers).status_code == 201
    yield


def test_a_new_single_trace_costs_one_round_trip_the_counters_and_the_insert(
    client: TestClient, admin_headers: dict[str, str], policy_name: str, database: Database,
    monkeypatch: pytest.MonkeyPatch, warm: None,
) -> None:
    with StatementLog(database, monkeypatch) as log:
        r = client.post("/v1/traces", json=trace("new", policy_name), headers=admin_headers)
    assert r.status_code == 201, r.text
    # Before: pre-ping, key lookup, policy lookup, insert, outcome UPDATE (plus BEGIN/COMMIT);
    # then the counters and the insert in two round trips, besides the BEGIN and the COMMIT.
    assert len(log.statements) == 2, log.statements
    assert log.statements[0].startswith("SELECT") and "cache_generations" in log.statements[0]
    assert log.statements[1].startswith("INSERT")
    # On Postgres, with the BEGIN, in one round trip.
    assert log.pipelined == [database.engine.dialect.name == "postgresql"] * 2


def test_a_duplicate_single_trace_costs_three_statements(
    client: TestClient, admin_headers: dict[str, str], policy_name: str, database: Database,
    monkeypatch: pytest.MonkeyPatch, warm: None,
) -> None:
    with StatementLog(database, monkeypatch) as log:
        r = client.post("/v1/traces", json=trace("warm", policy_name), headers=admin_headers)
    assert r.status_code == 200, r.text
    assert [s.split()[0] for s in log.statements] == ["SELECT", "INSERT", "SELECT"], \
        log.statements
    # On Postgres the stored row's lookup comes after them.
    assert log.pipelined == [database.engine.dialect.name == "postgresql"] * 2 + [False]


def test_a_trace_whose_outcome_came_first_gets_it_attached(
    client: TestClient, admin_headers: dict[str, str], policy_name: str, warm: None,
) -> None:
    r = client.post("/v1/feedback", json={"outcomes": [
        {"trace_external_id": "late", "name": "correct", "value": True}]}, headers=admin_headers)
    assert r.json()["results"][0]["status"] == "pending_trace", r.text
    created = client.post("/v1/traces", json=trace("late", policy_name), headers=admin_headers)
    assert created.status_code == 201
    stored = client.get(f"/v1/traces/{created.json()['id']}", headers=admin_headers).json()
    assert [o["name"] for o in stored["outcomes"]] == ["correct"]


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_the_next_request_succeeds_after_the_database_dropped_every_pooled_connection(
    client: TestClient, admin_headers: dict[str, str], policy_name: str, database: Database,
    warm: None,
) -> None:
    name = database.engine.url.database
    assert client.get("/v1/traces", headers=admin_headers).status_code == 200
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()", (name,)).fetchone()
    assert killed is not None and killed[0] >= 1
    r = client.post("/v1/traces", json=trace("after", policy_name), headers=admin_headers)
    assert r.status_code == 201, r.text
    assert client.get("/v1/traces", headers=admin_headers).status_code == 200
