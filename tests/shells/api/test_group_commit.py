"""Group commit on Postgres: concurrent single-trace POSTs are written many to a commit, each
answered after the commit that holds it, with the same per-trace answers as one at a time.

The commits are counted where they leave a mark that cannot be faked: ``xmin``, the id of the
transaction that wrote a row. Rows written by one commit share it."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator

import httpx
import psycopg
import pytest

from app.settings import Settings, set_settings
from tests.conftest import LiveServer

pytestmark = [pytest.mark.parametrize("db_url", ["postgres"], indirect=True),
              pytest.mark.timeout(120)]

CLIENTS = 24
PER_CLIENT = 10


def trace(ext: str, policy: str, answer: str = "ANSWER: YES") -> dict[str, object]:
    return {"external_id": ext, "policy": policy,
            "messages": [{"role": "user", "content": f"note {ext}"}], "response": answer,
            "outcome": {"name": "correct", "value": True}}


def served(settings: Settings, **overrides: object) -> LiveServer:
    tuned = settings.model_copy(update=overrides)
    set_settings(tuned)  # the route and the writer read the process's settings
    return LiveServer(tuned)


@pytest.fixture
def policy(settings: Settings, admin_headers: dict[str, str]) -> Iterator[str]:
    name = f"gc-{uuid.uuid4().hex[:8]}"
    with LiveServer(settings) as server:
        r = httpx.post(f"{server.url}/v1/policies", json={"name": name}, headers=admin_headers)
        assert r.status_code == 201, r.text
    yield name


def stored(db_url: str, tenant: str) -> dict[str, tuple[int, int]]:
    """external_id → (row id, id of the transaction that wrote it), and the outcome rows."""
    dsn = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT external_id, id, xmin::text::bigint FROM traces"
                            " WHERE tenant = %s", (tenant,)).fetchall()
    return {ext: (row_id, xid) for ext, row_id, xid in rows}


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

    requests = CLIENTS * PER_CLIENT
    assert Counter(status for status, _ in answers.values()) == {201: requests}
    rows = stored(db_url, tenant)
    # Every acknowledged trace is stored, under the id it was answered with.
    assert {ext: row_id for ext, (row_id, _) in rows.items()} == {
        ext: row_id for ext, (_, row_id) in answers.items()}
    commits = len({xid for _, xid in rows.values()})
    print(f"\ngroup commit: {requests} single-trace POSTs from {CLIENTS} clients written by "
          f"{commits} commits ({requests / commits:.1f} traces per commit)")
    assert commits <= requests // 4, commits


def test_the_same_external_id_twice_in_one_group_is_created_once_then_duplicate(
    settings: Settings, db_url: str, tenant: str, admin_headers: dict[str, str], policy: str,
) -> None:
    statuses: list[tuple[int, int]] = []

    def client(_: int) -> None:
        r = httpx.post(f"{server.url}/v1/traces", json=trace("same", policy),
                       headers=admin_headers, timeout=30)
        statuses.append((r.status_code, r.json()["id"]))

    # A long window, so both requests land in one group however the machine is loaded.
    with served(settings, group_commit_window_ms=300.0) as server:
        in_parallel(2, client)

    rows = stored(db_url, tenant)
    assert sorted(status for status, _ in statuses) == [200, 201]
    assert {row_id for _, row_id in statuses} == {rows["same"][0]}


def test_the_same_external_id_with_other_content_in_one_group_is_a_conflict(
    settings: Settings, db_url: str, tenant: str, admin_headers: dict[str, str], policy: str,
) -> None:
    answers: dict[str, int] = {}

    def client(i: int) -> None:
        answer = ("ANSWER: YES", "ANSWER: NO")[i]
        r = httpx.post(f"{server.url}/v1/traces", json=trace("contested", policy, answer),
                       headers=admin_headers, timeout=30)
        answers[answer] = r.status_code
        if r.status_code == 409:
            assert r.json()["type"].endswith("conflict"), r.text

    with served(settings, group_commit_window_ms=300.0) as server:
        in_parallel(2, client)

    assert sorted(answers.values()) == [201, 409]
    assert len(stored(db_url, tenant)) == 1


def test_a_known_trace_sent_again_among_new_ones_is_a_duplicate_and_outcomes_are_attached(
    settings: Settings, db_url: str, tenant: str, admin_headers: dict[str, str], policy: str,
) -> None:
    answers: dict[str, int] = {}

    with served(settings, group_commit_window_ms=300.0) as server:
        first = httpx.post(f"{server.url}/v1/traces", json=trace("known", policy),
                           headers=admin_headers, timeout=30)
        assert first.status_code == 201, first.text

        def client(i: int) -> None:
            ext = "known" if i == 0 else f"new-{i}"
            r = httpx.post(f"{server.url}/v1/traces", json=trace(ext, policy),
                           headers=admin_headers, timeout=30)
            answers[ext] = r.status_code

        in_parallel(4, client)

    assert answers == {"known": 200, "new-1": 201, "new-2": 201, "new-3": 201}
    dsn = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        outcomes = conn.execute(
            "SELECT count(*) FROM outcomes o JOIN traces t ON t.id = o.trace_id"
            " WHERE o.tenant = %s", (tenant,)).fetchone()
    assert outcomes is not None and outcomes[0] == 4  # one inline outcome per trace, once


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
) -> None:
    answers: dict[str, int] = {}

    def client(i: int) -> None:
        ext = refused_by_the_database if i == 0 else f"fine-{i}"
        r = httpx.post(f"{server.url}/v1/traces", json=trace(ext, policy),
                       headers=admin_headers, timeout=30)
        answers[ext] = r.status_code

    with served(settings, group_commit_window_ms=300.0) as server:
        in_parallel(4, client)

    assert answers == {"poison": 422, "fine-1": 201, "fine-2": 201, "fine-3": 201}
    assert set(stored(db_url, tenant)) == {"fine-1", "fine-2", "fine-3"}
