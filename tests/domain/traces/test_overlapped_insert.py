"""A batch is inserted chunk by chunk while the next chunk's rows are made (``OverlappedInsert``):
the results are those of one insert of the whole batch, on Postgres the statement of a chunk is
on the server before the next chunk is made (not waited for), and a failure on either side
leaves nothing written and the session usable."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import ProgrammingError

from app.auth.service import Principal
from app.db import Database
from app.models import Policy, Trace
from app.settings import Settings
from app.traces import service
from app.traces.schemas import ItemStatus


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "_OVERLAP_CHUNK", 4)


def trace(principal: Principal, external_id: str, answer: str = "ANSWER: YES"
          ) -> dict[str, Any]:
    return {"external_id": external_id, "policy": principal.tenant,
            "messages": [{"role": "user", "content": f"case {external_id}"}],
            "response": answer}


def stored_count(database: Database, tenant: str) -> int:
    with database.session() as session:
        return int(session.scalar(select(func.count()).where(Trace.tenant == tenant)) or 0)


@pytest.mark.usefixtures("small_chunks")
def test_repeats_across_chunks_are_judged_as_in_one_insert(
    database: Database, settings: Settings, principal: Principal
) -> None:
    with database.session() as session:
        service.ingest(session, principal, [trace(principal, "stored")], settings)
        session.commit()
    batch = [trace(principal, f"n{i}") for i in range(10)]
    batch[1] = trace(principal, "stored")  # stored before, same content
    # Chunks of 4: [n0 stored n2 n3] [n4 n5 n0 n2'] [n8 n5].
    batch[6] = trace(principal, "n0")  # a repeat of the first chunk's first item
    batch[7] = trace(principal, "n2", answer="ANSWER: NO")  # the first chunk's, other content
    batch[9] = trace(principal, "n5")  # a repeat of the chunk before
    with database.session() as session:
        result = service.ingest(session, principal, batch, settings)
        session.commit()
    statuses = [r.status for r in result.results]
    assert statuses == [ItemStatus.created, ItemStatus.duplicate, ItemStatus.created,
                        ItemStatus.created, ItemStatus.created, ItemStatus.created,
                        ItemStatus.duplicate, ItemStatus.conflict, ItemStatus.created,
                        ItemStatus.duplicate]
    ids = [r.id for r in result.results]
    assert ids[6] == ids[0] and ids[9] == ids[5] and ids[7] == ids[2]
    assert len(set(ids)) == 7  # 6 new rows and the one stored before
    assert stored_count(database, principal.tenant) == 7


# Pipeline mode is Postgres's: SQLite inserts each chunk at once.
pg_only = pytest.mark.parametrize("db_url", ["postgres"], indirect=True)


@pg_only
@pytest.mark.usefixtures("small_chunks")
def test_a_chunk_is_sent_before_the_next_is_made_and_not_waited_for(
    database: Database, settings: Settings, principal: Principal, db_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another transaction holds the first trace's key, so the first chunk's insert blocks on
    it: the second chunk is still made while that insert waits (a blocking insert would
    deadlock here), and the batch completes once the holder gives way."""
    dsn = db_url.replace("+psycopg", "")
    blocker = psycopg.connect(dsn)
    seen: list[tuple[str, str | None, str]] = []

    def watch_then_give_way() -> None:
        with psycopg.connect(dsn, autocommit=True) as watcher:
            row = watcher.execute(
                "SELECT state, wait_event_type, query FROM pg_stat_activity"
                " WHERE query LIKE 'INSERT INTO traces%%' AND pid <> pg_backend_pid()"
                " AND datname = current_database()").fetchone()
        assert row is not None
        seen.append(row)
        blocker.rollback()

    on_chunk(monkeypatch, "b4", watch_then_give_way)  # the second chunk
    with database.session() as session:
        policy_id = session.scalar(select(Policy.id).where(Policy.tenant == principal.tenant))
    blocker.execute(
        "INSERT INTO traces (tenant, external_id, policy_id, messages, response, request, "
        "trainable, split, redactions, content_hash, created_at, metadata) VALUES "
        "(%s, 'b0', %s, '[]', '', '{}', true, 'train', '{}', 'x', now(), '{}')",
        (principal.tenant, policy_id))
    try:
        with database.session() as session:
            # An insert that waited for its answer fails here instead of hanging.
            session.execute(text("SET LOCAL lock_timeout = '5s'"))
            result = service.ingest(session, principal,
                                    [trace(principal, f"b{i}") for i in range(8)], settings)
            session.commit()
    finally:
        blocker.close()
    assert seen and seen[0][0] == "active" and seen[0][1] == "Lock"
    assert result.counts["created"] == 8


def on_chunk(monkeypatch: pytest.MonkeyPatch, first_external_id: str,
             action: Callable[[], None]) -> None:
    """Run ``action`` when the chunk that opens with ``first_external_id`` is about to be made."""
    made = service.admit_items

    def admit_items(items: Any, admission: service.Admission) -> Any:
        if items[0][1]["external_id"] == first_external_id:
            action()
        return made(items, admission)

    monkeypatch.setattr(service, "admit_items", admit_items)


def assert_nothing_written_and_session_usable(
    database: Database, settings: Settings, principal: Principal, batch: list[dict[str, Any]],
) -> None:
    assert stored_count(database, principal.tenant) == 0
    with database.session() as session:  # the pooled connection serves the next batch
        result = service.ingest(session, principal, batch, settings)
        session.commit()
    assert result.counts["created"] == len(batch)


@pg_only
@pytest.mark.usefixtures("small_chunks")
def test_a_failed_chunk_fails_the_batch_as_sqlalchemy_would(
    database: Database, settings: Settings, principal: Principal,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    batch = [trace(principal, f"f{i}") for i in range(10)]
    # The first chunk is sent by the time the second is made: break the second's statement.
    on_chunk(monkeypatch, "f4", lambda: monkeypatch.setattr(
        service, "_PIPELINED_INSERT", "INSERT INTO no_such_table VALUES (%s)"))
    with pytest.raises(ProgrammingError, match="no_such_table"), database.session() as session:
        service.ingest(session, principal, batch, settings)
    monkeypatch.undo()
    assert_nothing_written_and_session_usable(database, settings, principal, batch)


@pytest.mark.usefixtures("small_chunks")
def test_a_failure_while_making_rows_propagates_and_writes_nothing(
    database: Database, settings: Settings, principal: Principal,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    batch = [trace(principal, f"m{i}") for i in range(10)]

    def broken() -> None:
        raise RuntimeError("redaction broke")

    on_chunk(monkeypatch, "m8", broken)  # the third chunk: two chunks sent before it
    with pytest.raises(RuntimeError, match="redaction broke"), database.session() as session:
        service.ingest(session, principal, batch, settings)
    monkeypatch.undo()
    assert_nothing_written_and_session_usable(database, settings, principal, batch)


def test_a_batch_of_refused_items_takes_no_connection(
    database: Database, settings: Settings, principal: Principal
) -> None:
    with database.session() as session:
        result = service.ingest(session, principal, [{"external_id": "x"}, 3], settings)
        assert not session.in_transaction()
    assert result.counts["invalid"] == 2
