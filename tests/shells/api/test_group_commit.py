"""Group commit on Postgres: concurrent single-trace POSTs are written many to a commit, each
answered after the commit that holds it, with the same per-trace answers as one at a time.

The commits are counted where they leave a mark that cannot be faked: ``xmin``, the id of the
transaction that wrote a row. Rows written by one commit share it."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import httpx
import psycopg
import pytest
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from app.auth.service import revoke_key
from app.db import Database, make_engine, set_database
from app.models import ApiKey
from app.settings import Settings, set_settings
from app.traces import group_commit
from app.traces.group_commit import WRITER_APPLICATION_NAME, writer
from tests.conftest import LiveServer

pytestmark = [pytest.mark.parametrize("db_url", ["postgres"], indirect=True),
              pytest.mark.timeout(120)]

CLIENTS = 24
PER_CLIENT = 10
CROWD = 120  # concurrent clients: three times the threadpool (40)


def a_trace(ext: str, policy: str, answer: str = "ANSWER: YES",
            outcome: bool = True) -> dict[str, object]:
    body: dict[str, object] = {
        "external_id": ext, "policy": policy,
        "messages": [{"role": "user", "content": f"note {ext}"}], "response": answer}
    if outcome:
        body["outcome"] = {"name": "correct", "value": True}
    return body


@pytest.fixture(params=[True, False], ids=["inline-outcome", "no-outcome"])
def trace(request: pytest.FixtureRequest) -> Callable[..., dict[str, object]]:
    """``a_trace``, with an inline outcome or without: a group of traces without one is written
    on the writer's own connection, on the event loop; one with an outcome is written the
    ordinary way, on a session in a thread."""
    return partial(a_trace, outcome=request.param)


def served(settings: Settings, **overrides: object) -> LiveServer:
    tuned = settings.model_copy(update=overrides)
    set_settings(tuned)  # the route and the writer read the process's settings
    return LiveServer(tuned)


@pytest.fixture
def policy(policy_name: str) -> str:
    return policy_name


def stored(db_url: str, tenant: str) -> dict[str, tuple[int, int]]:
    """external_id → (row id, id of the transaction that wrote it), and the outcome rows."""
    dsn = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT external_id, id, xmin::text::bigint FROM traces"
                            " WHERE tenant = %s", (tenant,)).fetchall()
    return {ext: (row_id, xid) for ext, row_id, xid in rows}


@contextmanager
def writer_held(db_url: str, url: str, headers: dict[str, str], policy: str) -> Iterator[None]:
    """The writer stuck on a group of its own (its INSERT waits on a table lock) while the block
    runs: what the block sends queues up and is written, on release, as one group."""
    dsn = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as lock:
        lock.execute("LOCK TABLE traces IN EXCLUSIVE MODE")
        blocker = threading.Thread(target=lambda: httpx.post(
            f"{url}/v1/traces", json=a_trace(f"blocker-{uuid.uuid4().hex[:6]}", policy),
            headers=headers, timeout=60))
        blocker.start()
        wait_for(lambda: writer.waiting == 0 and stuck_on_lock(lock))
        yield
        lock.commit()
    blocker.join(timeout=60)


def stuck_on_lock(conn: psycopg.Connection[tuple[object, ...]]) -> bool:
    row = conn.execute("SELECT count(*) FROM pg_locks WHERE relation = 'traces'::regclass"
                       " AND NOT granted").fetchone()
    return row is not None and row[0] > 0


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class Posts:
    """Single-trace POSTs sent at once, each from its own thread."""

    def __init__(self, url: str, headers: dict[str, str], bodies: list[dict[str, object]]):
        self.answers: dict[int, httpx.Response] = {}
        self.threads = [threading.Thread(target=self._post, args=(i, url, headers, body))
                        for i, body in enumerate(bodies)]
        for t in self.threads:
            t.start()

    def _post(self, i: int, url: str, headers: dict[str, str], body: dict[str, object]) -> None:
        self.answers[i] = httpx.post(f"{url}/v1/traces", json=body, headers=headers, timeout=60)

    def responses(self) -> list[httpx.Response]:
        for t in self.threads:
            t.join(timeout=60)
        return [self.answers[i] for i in range(len(self.threads))]


def in_parallel(n: int, call: Callable[[int], None]) -> None:
    start = threading.Barrier(n)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        start.wait()
        try:
            call(i)
        except BaseException as exc:  # reported below, not lost in a thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[:3]


def test_concurrent_single_traces_share_commits_and_every_acknowledged_one_is_stored(
    settings: Settings, db_url: str, tenant: str, admin_headers: dict[str, str], policy: str,
    trace: Callable[..., dict[str, object]],
) -> None:
    answers: dict[str, tuple[int, int]] = {}
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(headers=admin_headers, timeout=30) as http:
            for n in range(PER_CLIENT):
                ext = f"c{i}-{n}"
                r = http.post(f"{server.url}/v1/traces", json=trace(ext, policy))
                with lock:
                    answers[ext] = (r.status_code, r.json().get("id"))

    with served(settings, group_commit_window_ms=5.0) as server:
        in_parallel(CLIENTS, client)
        metrics = httpx.get(f"{server.url}/metrics").text

    requests = CLIENTS * PER_CLIENT
    assert Counter(status for status, _ in answers.values()) == {201: requests}
    rows = stored(db_url, tenant)
    # Every acknowledged trace is stored, under the id it was answered with.
    assert {ext: row_id for ext, (row_id, _) in rows.items()} == {
        ext: row_id for ext, (_, row_id) in answers.items()}
    commits = len({xid for _, xid in rows.values()})
    assert "tracelearn_ingest_group_traces_count" in metrics
    print(f"\ngroup commit: {requests} single-trace POSTs from {CLIENTS} clients written by "
          f"{commits} commits ({requests / commits:.1f} traces per commit)")
    assert commits <= requests // 4, commits


def test_the_same_external_id_twice_in_one_group_is_created_once_then_duplicate(
    settings: Settings, db_url: str, tenant: str, admin_headers: dict[str, str], policy: str,
    trace: Callable[..., dict[str, object]],
) -> None:
    with served(settings) as server:
        with writer_held(db_url, server.url, admin_headers, policy):
            posts = Posts(server.url, admin_headers, [trace("same", policy)] * 2)
            wait_for(lambda: writer.waiting == 2)
        answers = posts.responses()

    assert sorted(r.status_code for r in answers) == [200, 201]
    assert {r.json()["id"] for r in answers} == {stored(db_url, tenant)["same"][0]}


def test_the_same_external_id_with_other_content_in_one_group_is_a_conflict(
    settings: Settings, db_url: str, tenant: str, admin_headers: dict[str, str], policy: str,
    trace: Callable[..., dict[str, object]],
) -> None:
    bodies = [trace("contested", policy, "ANSWER: YES"), trace("contested", policy, "ANSWER: NO")]
    with served(settings) as server:
        with writer_held(db_url, server.url, admin_headers, policy):
            posts = Posts(server.url, admin_headers, bodies)
            wait_for(lambda: writer.waiting == 2)
        answers = posts.responses()

    assert sorted(r.status_code for r in answers) == [201, 409]
    conflict = next(r for r in answers if r.status_code == 409)
    assert conflict.json()["type"].endswith("conflict"), conflict.text
    assert "contested" in stored(db_url, tenant)


def test_a_known_trace_sent_again_among_new_ones_is_a_duplicate_and_outcomes_are_attached(
    settings: Settings, db_url: str, tenant: str, admin_headers: dict[str, str], policy: str,
) -> None:
    exts = ["known", "new-1", "new-2", "new-3"]
    with served(settings) as server:
        first = httpx.post(f"{server.url}/v1/traces", json=a_trace("known", policy),
                           headers=admin_headers, timeout=30)
        assert first.status_code == 201, first.text
        with writer_held(db_url, server.url, admin_headers, policy):
            posts = Posts(server.url, admin_headers, [a_trace(e, policy) for e in exts])
            wait_for(lambda: writer.waiting == 4)
        answers = posts.responses()

    assert [r.status_code for r in answers] == [200, 201, 201, 201]
    rows = stored(db_url, tenant)
    assert len({rows[e][1] for e in exts[1:]}) == 1  # the three new ones: one commit
    dsn = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        outcomes = conn.execute(
            "SELECT t.external_id FROM outcomes o JOIN traces t ON t.id = o.trace_id"
            " WHERE o.tenant = %s", (tenant,)).fetchall()
    assert sorted(ext for (ext,) in outcomes if not ext.startswith("blocker")) == sorted(exts)


def test_a_group_writes_its_plain_traces_in_one_statement_and_the_rest_on_a_session(
    settings: Settings, db_url: str, tenant: str, admin_headers: dict[str, str], policy: str,
) -> None:
    """The writer's statement inserts the traces it can write alone; one with an inline outcome
    and one whose outcome came first are left out of it and written the ordinary way, their
    outcomes attached, in the same group's turn."""
    exts = ["plain-1", "plain-2", "inline", "awaited"]
    with served(settings) as server:
        early = httpx.post(f"{server.url}/v1/feedback", json={"outcomes": [
            {"trace_external_id": "awaited", "name": "correct", "value": True}]},
            headers=admin_headers, timeout=30)
        assert early.json()["results"][0]["status"] == "pending_trace", early.text
        bodies = [a_trace("plain-1", policy, outcome=False),
                  a_trace("plain-2", policy, outcome=False),
                  a_trace("inline", policy), a_trace("awaited", policy, outcome=False)]
        with writer_held(db_url, server.url, admin_headers, policy):
            posts = Posts(server.url, admin_headers, bodies)
            wait_for(lambda: writer.waiting == 4)
        answers = posts.responses()

    assert [r.status_code for r in answers] == [201] * 4, [r.text for r in answers]
    rows = stored(db_url, tenant)
    assert [r.json()["id"] for r in answers] == [rows[e][0] for e in exts]
    assert rows["plain-1"][1] == rows["plain-2"][1]  # one statement, one commit
    assert rows["inline"][1] != rows["plain-1"][1] and rows["awaited"][1] != rows["plain-1"][1]
    dsn = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        attached = conn.execute(
            "SELECT t.external_id FROM outcomes o JOIN traces t ON t.id = o.trace_id"
            " WHERE o.tenant = %s", (tenant,)).fetchall()
        waiting = conn.execute("SELECT count(*) FROM outcomes WHERE tenant = %s"
                               " AND trace_id IS NULL", (tenant,)).fetchone()
    assert sorted(ext for (ext,) in attached if not ext.startswith("blocker")) == [
        "awaited", "inline"]
    assert waiting == (0,)


def test_a_lone_request_is_not_held_for_the_window(
    settings: Settings, admin_headers: dict[str, str], policy: str,
) -> None:
    with served(settings, group_commit_window_ms=1000.0) as server:
        started = time.monotonic()
        for n in range(3):
            r = httpx.post(f"{server.url}/v1/traces", json=a_trace(f"lone-{n}", policy),
                           headers=admin_headers, timeout=30)
            assert r.status_code == 201, r.text
        elapsed = time.monotonic() - started
    # Held for the window, three requests in a row would take 3 s at least.
    assert elapsed < 2.0, elapsed


@pytest.fixture
def refused_by_the_database(db_url: str, tenant: str) -> Iterator[str]:
    """A trigger that refuses one external_id of this test's tenant as the database refuses a
    value it cannot store (SQLSTATE class 22): the one thing validation cannot see coming."""
    dsn = db_url.replace("postgresql+psycopg://", "postgresql://")
    fn = f"refuse_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"""CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'refused' USING ERRCODE = '22023'; END $$""")
        conn.execute(f"""CREATE TRIGGER {fn} BEFORE INSERT ON traces FOR EACH ROW
            WHEN (NEW.tenant = '{tenant}' AND NEW.external_id = 'poison')
            EXECUTE FUNCTION {fn}()""")
    try:
        yield "poison"
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP TRIGGER {fn} ON traces")
            conn.execute(f"DROP FUNCTION {fn}()")


def test_a_trace_the_database_refuses_fails_alone_and_its_group_is_stored(
    settings: Settings, db_url: str, tenant: str, admin_headers: dict[str, str], policy: str,
    refused_by_the_database: str,
    trace: Callable[..., dict[str, object]],
) -> None:
    exts = [refused_by_the_database, "fine-1", "fine-2", "fine-3"]
    with served(settings) as server:
        with writer_held(db_url, server.url, admin_headers, policy):
            posts = Posts(server.url, admin_headers, [trace(e, policy) for e in exts])
            wait_for(lambda: writer.waiting == 4)
        answers = posts.responses()

    assert [r.status_code for r in answers] == [422, 201, 201, 201]
    assert {e for e in stored(db_url, tenant) if not e.startswith("blocker")} == set(exts[1:])


def test_a_request_waiting_for_its_group_holds_no_database_connection(
    settings: Settings, db_url: str, admin_headers: dict[str, str], policy: str,
    database: Database,
    trace: Callable[..., dict[str, object]],
) -> None:
    with served(settings) as server:
        with writer_held(db_url, server.url, admin_headers, policy):
            posts = Posts(server.url, admin_headers, [trace(f"w-{i}", policy) for i in range(6)])
            wait_for(lambda: writer.waiting == 6)
            # Only the blocker's session, stuck on the lock, is out of the pool (its trace
            # carries an outcome: written on a session; the writer's own connection is not
            # the pool's).
            in_use = database.engine.pool.checkedout()  # type: ignore[attr-defined]
        answers = posts.responses()
    assert in_use == 1
    assert [r.status_code for r in answers] == [201] * 6


def test_more_concurrent_requests_than_pooled_connections_all_get_their_answer(
    settings: Settings, db_url: str, tenant: str, admin_headers: dict[str, str], policy: str,
    database: Database,
) -> None:
    """Auth ends its read-only transaction before the route's next thread hop, so no request
    holds a pooled connection while it waits for a thread. Holding it wedged the server under
    wrk at 200 connections (0 requests answered): every connection held by a request waiting
    for a thread, every thread waiting for a connection. Here: 2 connections, more clients than the 40 threads."""
    small = Database(settings)
    small.engine.dispose()
    small.engine = make_engine(settings.resolved_database_url, pool_size=2, max_overflow=0,
                               pool_timeout=20)
    small.sessionmaker = sessionmaker(small.engine, expire_on_commit=False)
    set_database(small)
    statuses: list[int] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(headers=admin_headers, timeout=60) as http:
            r = http.post(f"{server.url}/v1/traces", json=a_trace(f"pool-{i}", policy))
            with lock:
                statuses.append(r.status_code)

    try:
        with served(settings) as server:
            in_parallel(CROWD, client)
    finally:
        set_database(database)
    assert Counter(statuses) == {201: CROWD}
    assert len([e for e in stored(db_url, tenant) if e.startswith("pool-")]) == CROWD


def test_a_group_whose_cached_rows_went_stale_still_writes_the_rows_the_route_admitted(
    settings: Settings, db_url: str, tenant: str, admin_headers: dict[str, str], policy: str,
    make_key: Callable[..., str], database: Database,
    trace: Callable[..., dict[str, object]],
) -> None:
    """One group, two rows: one admitted from the caches under a key revoked before the group
    was written, one admitted by the route (a key not cached yet). The counters read with the
    INSERT have moved, so the whole attempt is rolled back; the route's row is written again on
    its own, the cached one is handed back and refused by the route."""
    cold = {"Authorization": f"Bearer {make_key(tenant)}"}
    doomed_key = make_key(tenant)
    doomed = {"Authorization": f"Bearer {doomed_key}"}
    with served(settings) as server:
        warm = httpx.post(f"{server.url}/v1/traces", json=trace("warm", policy),
                          headers=doomed, timeout=30)
        assert warm.status_code == 201, warm.text  # the route's, caching the doomed key
        with writer_held(db_url, server.url, admin_headers, policy):
            cached = Posts(server.url, doomed, [trace("from-the-caches", policy)])
            routed = Posts(server.url, cold, [trace("from-the-route", policy)])
            wait_for(lambda: writer.waiting == 2)
            with database.session() as session:
                prefix = doomed_key.split("_")[1]
                key_id = session.scalar(select(ApiKey.id).where(ApiKey.prefix == prefix))
                assert key_id is not None
                revoke_key(session, key_id)
        (refused,), (created,) = cached.responses(), routed.responses()

    assert (refused.status_code, created.status_code) == (401, 201), (refused.text, created.text)
    rows = stored(db_url, tenant)
    assert "from-the-route" in rows and "from-the-caches" not in rows


def writer_backends(db_url: str) -> list[int]:
    dsn = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                            (WRITER_APPLICATION_NAME,)).fetchall()
    return [pid for (pid,) in rows]


def test_the_writers_connection_found_dead_is_replaced_and_no_request_fails(
    settings: Settings, db_url: str, tenant: str, admin_headers: dict[str, str], policy: str,
) -> None:
    with served(settings) as server:
        first = httpx.post(f"{server.url}/v1/traces", json=a_trace("first", policy, outcome=False),
                           headers=admin_headers, timeout=30)
        assert first.status_code == 201, first.text
        (pid,) = writer_backends(db_url)
        dsn = db_url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        # A query string sends it past the cached path, straight to the route: a failure in
        # the writer would be its answer (503), not handed on to be tried again.
        after = httpx.post(f"{server.url}/v1/traces?via=route",
                           json=a_trace("after", policy, outcome=False),
                           headers=admin_headers, timeout=30)
        assert after.status_code == 201, after.text
        assert writer_backends(db_url) not in ([], [pid])
    assert {"first", "after"} <= set(stored(db_url, tenant))


def test_an_idle_writer_closes_its_connection(
    settings: Settings, db_url: str, admin_headers: dict[str, str], policy: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(group_commit, "_IDLE_S", 0.2)
    with served(settings) as server:
        r = httpx.post(f"{server.url}/v1/traces", json=a_trace("once", policy, outcome=False),
                       headers=admin_headers, timeout=30)
        assert r.status_code == 201, r.text
        assert len(writer_backends(db_url)) == 1
        wait_for(lambda: writer_backends(db_url) == [], timeout=10)
        again = httpx.post(f"{server.url}/v1/traces", json=a_trace("again", policy, outcome=False),
                           headers=admin_headers, timeout=30)
        assert again.status_code == 201, again.text
