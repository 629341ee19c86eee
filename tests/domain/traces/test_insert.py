"""The Postgres insert of traces (all rows as one JSON parameter) stores exactly what the bound
multi-row INSERT that SQLite keeps stores: JSON nulls as JSON, naive timestamps as UTC, integers
beyond 64 bits exact."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from sqlalchemy import text

from app.db import Database
from app.models import Policy, Split
from app.traces import service


@pytest.fixture
def db_url(pg_url: str) -> str:
    return pg_url


def rows(tenant: str, policy_id: int) -> list[dict[str, Any]]:
    now = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
    bare = {
        "tenant": tenant, "external_id": "bare", "policy_id": policy_id,
        "messages": [{"role": "user", "content": "é \u2028 \"quoted\" \\ back", "name": None}],
        "response": "ANSWER: YES", "response_message": None, "request": {},
        "finish_reason": None, "usage": None, "tags": None, "user_id": None, "session_id": None,
        "trainable": True, "untrainable_reason": None, "model": None, "snapshot_id": None,
        "metadata": {"f": 3.7, "tiny": 1e-300, "none": None, "nested": [1, [2, {"k": False}]]},
        "split": Split.train, "redactions": {"disabled": True}, "content_hash": "a" * 64,
        "occurred_at": None, "created_at": now,
    }
    full = bare | {
        "external_id": "full", "response_message": {"role": "assistant", "content": None,
                                                    "tool_calls": []},
        "request": {"tools": [{"type": "function"}], "parallel_tool_calls": False},
        "finish_reason": "stop", "usage": {"prompt_tokens": 1}, "tags": ["a", "b"],
        "user_id": "u", "session_id": "s", "trainable": False,
        "untrainable_reason": "image_content", "model": "m", "split": Split.heldout,
        "redactions": {"EMAIL": 2, "mode": "hash"},
        "occurred_at": datetime(2024, 1, 2, 3, 4, 5, 678901),  # naive: read as UTC
    }
    offset = bare | {"external_id": "offset",
                     "occurred_at": datetime(2024, 1, 2, 3, 4, 5,
                                             tzinfo=timezone(timedelta(hours=5)))}
    return [bare, full, offset]


def stored(pg_url: str, tenant: str) -> dict[str, tuple[Any, ...]]:
    """Every column as Postgres renders it (JSON null and SQL NULL told apart), by external_id."""
    with psycopg.connect(pg_url.replace("+psycopg", "")) as conn:
        columns = [c for (c,) in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'traces'"
            " AND column_name NOT IN ('id', 'tenant') ORDER BY column_name")]
        select = ", ".join(f"{c}::text" for c in columns)
        return {r[0]: r for r in conn.execute(
            f"SELECT external_id, {select} FROM traces WHERE tenant = %s", (tenant,))}


@pytest.mark.parametrize("big_integer", [False, True], ids=["orjson", "stdlib-json"])
def test_the_postgres_insert_stores_what_the_bound_insert_stores(
    database: Database, pg_url: str, big_integer: bool
) -> None:
    old, new = f"old-{uuid.uuid4().hex[:8]}", f"new-{uuid.uuid4().hex[:8]}"
    with database.session() as session:
        policy = Policy(tenant=old, name=old, base_model="m")
        session.add(policy)
        session.flush()
        # A naive timestamp must not be read in the connection's zone.
        session.execute(text("SET LOCAL TIME ZONE 'Asia/Kolkata'"))
        for tenant, insert in ((old, service._insert_portable), (new, service._insert_postgres)):
            batch = rows(tenant, policy.id)
            if big_integer:  # beyond 64 bits: orjson refuses it, the stdlib writes it exactly
                batch[0]["metadata"] = batch[0]["metadata"] | {"big": 2**70}
            returned = [tuple(r) for r in insert(session, batch)]
            assert [(t, ext, Split(split), waiting) for _, t, ext, split, waiting in returned] == [
                (tenant, "bare", Split.train, False), (tenant, "full", Split.heldout, False),
                (tenant, "offset", Split.train, False)]
    assert stored(pg_url, new) == stored(pg_url, old)
    assert stored(pg_url, new)["bare"] != stored(pg_url, new)["full"]


def test_a_row_already_stored_is_not_returned(database: Database) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    with database.session() as session:
        policy = Policy(tenant=tenant, name=tenant, base_model="m")
        session.add(policy)
        session.flush()
        first = list(service._insert_postgres(session, rows(tenant, policy.id)[:1]))
        again = list(service._insert_postgres(session, rows(tenant, policy.id)))
    assert [r[2] for r in first] == ["bare"]
    assert sorted(r[2] for r in again) == ["full", "offset"]

