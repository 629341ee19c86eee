"""A batch's outcomes and their audit events are written in one statement each: on Postgres as
one JSON array parameter (``json_array_insert_sql``), which must store exactly what the bound
insert stores; ``record_each`` writes the rows ``record`` writes, on both databases."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from sqlalchemy import select

from app.audit import record, record_each
from app.db import Database
from app.models import AuditEvent, OutcomeOrigin, OutcomeSource
from app.traces import outcomes


def outcome_rows(tenant: str) -> list[dict[str, Any]]:
    at = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
    base = {"tenant": tenant, "trace_id": None, "source": OutcomeSource.annotation,
            "origin": OutcomeOrigin.inline, "labelled_at": at, "created_at": at,
            "updated_at": at}
    values: list[Any] = [None, "ANSWER: YES", 0.25, 1e-300, True, [1, [2, {"k": None}]],
                         {"é": "\u2028 \"quoted\" \\ back", "n": -3}, 2**70]
    rows = [base | {"trace_external_id": f"t{i}", "name": "correct", "value": v}
            for i, v in enumerate(values)]
    # A naive timestamp is read as UTC; an offset is kept as the instant it names.
    rows[0]["labelled_at"] = datetime(2024, 1, 2, 3, 4, 5, 678901)
    rows[1]["labelled_at"] = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=5)))
    return rows


def stored_outcomes(pg_url: str, tenant: str) -> dict[str, tuple[Any, ...]]:
    """Every column as Postgres renders it (JSON null and SQL NULL told apart)."""
    with psycopg.connect(pg_url.replace("+psycopg", "")) as conn:
        return {r[0]: r for r in conn.execute(
            "SELECT trace_external_id, name, trace_id::text, value::text, value IS NULL, source,"
            " origin, labelled_at::text, created_at::text, updated_at::text FROM outcomes"
            " WHERE tenant = %s", (tenant,))}


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_the_postgres_outcome_insert_stores_what_the_bound_insert_stores(
    database: Database, pg_url: str
) -> None:
    bound, json_array = f"b-{uuid.uuid4().hex[:8]}", f"j-{uuid.uuid4().hex[:8]}"
    with database.session() as session:
        returned = {
            tenant: sorted((ext, name) for _, ext, name in insert(session, outcome_rows(tenant)))
            for tenant, insert in ((bound, outcomes._insert_portable),
                                   (json_array, outcomes._insert_postgres))
        }
        # A key already stored is not inserted again, nor returned.
        again = list(outcomes._insert_postgres(session, outcome_rows(json_array)[:2]))
    assert returned[json_array] == returned[bound] == sorted(
        (f"t{i}", "correct") for i in range(8))
    assert again == []
    assert stored_outcomes(pg_url, json_array) == stored_outcomes(pg_url, bound)
    assert stored_outcomes(pg_url, json_array)["t0"][3:5] == ("null", False)  # JSON null


def test_record_each_writes_what_record_writes(database: Database) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    changes: list[tuple[int | str, dict[str, Any], dict[str, Any]]] = [
        (7, {}, {"trace_external_id": "x", "name": "correct", "value": {"a": [1, None]}}),
        ("eight", {"value": "é"}, {"value": None}),
    ]
    with database.session() as session:
        for entity_id, before, after in changes:
            record(session, tenant, "key:1", "outcome.set", "outcome", entity_id,
                   before=before, after=after)
        session.flush()
        record_each(session, tenant, "key:1", "outcome.set", "outcome", changes)
        record_each(session, tenant, "key:1", "outcome.set", "outcome", [])  # writes nothing
    with database.session() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.tenant == tenant)
                                 .order_by(AuditEvent.id)).all()
        rows = [(e.tenant, e.actor, e.action, e.entity_type, e.entity_id, e.before, e.after,
                 e.reason) for e in events]
        assert all(e.created_at.tzinfo is not None for e in events)
    assert len(rows) == 4
    assert rows[2:] == rows[:2]
    assert rows[0][4:7] == ("7", {}, changes[0][2])
