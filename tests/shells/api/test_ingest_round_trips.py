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
    """Every statement sent while it is open, whole. On Postgres it is read at psycopg's
    ``Cursor.execute`` and ``AsyncCursor.execute``, which SQLAlchemy's statements and those the
    group writer sends on its own connection go through; on SQLite, from SQLAlchemy."""

    def __init__(self, database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
        self.engine = database.engine
        self.monkeypatch = monkeypatch
        self.statements: list[str] = []

    @property
    def verbs(self) -> list[str]:
        return [statement.split(None, 1)[0].upper() for statement in self.statements]

    def _record_event(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.statements.append(statement)

    def __enter__(self) -> StatementLog:
        if self.engine.dialect.name != "postgresql":
            event.listen(self.engine, "before_cursor_execute", self._record_event)
            return self
        execute, execute_async = psycopg.Cursor.execute, psycopg.AsyncCursor.execute

        def recorded(cursor: psycopg.Cursor[Any], query: Any, *args: Any, **kwargs: Any) -> Any:
            self.statements.append(str(query))
            return execute(cursor, query, *args, **kwargs)

        async def recorded_async(cursor: psycopg.AsyncCursor[Any], query: Any, *args: Any,
                                 **kwargs: Any) -> Any:
            self.statements.append(str(query))
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


def test_a_new_single_trace_costs_one_statement_on_postgres_and_two_elsewhere(
    client: TestClient, admin_headers: dict[str, str], policy_name: str, database: Database,
    monkeypatch: pytest.MonkeyPatch, warm: None,
) -> None:
    with StatementLog(database, monkeypatch) as log:
        r = client.post("/v1/traces", json=trace("new", policy_name), headers=admin_headers)
    assert r.status_code == 201, r.text
    # Before: pre-ping, key lookup, policy lookup, insert, outcome UPDATE (plus BEGIN/COMMIT).
    if database.engine.dialect.name == "postgresql":
        # The group writer's one statement, in autocommit: the counters read in its snapshot,
        # the insert and the commit in one round trip; no BEGIN, no COMMIT.
        assert log.verbs == ["WITH"], log.statements
        assert "cache_generations" in log.statements[0]
        assert "INSERT INTO traces" in log.statements[0]
    else:
        assert log.verbs == ["SELECT", "INSERT"], log.statements
        assert "cache_generations" in log.statements[0]


def test_a_duplicate_single_trace_costs_one_more_statement_its_lookup(
    client: TestClient, admin_headers: dict[str, str], policy_name: str, database: Database,
    monkeypatch: pytest.MonkeyPatch, warm: None,
) -> None:
    with StatementLog(database, monkeypatch) as log:
        r = client.post("/v1/traces", json=trace("warm", policy_name), headers=admin_headers)
    assert r.status_code == 200, r.text
    if database.engine.dialect.name == "postgresql":
        assert log.verbs == ["WITH", "SELECT"], log.statements
    else:
        assert log.verbs == ["SELECT", "INSERT", "SELECT"], log.statements


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
