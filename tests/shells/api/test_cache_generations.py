"""The process caches of API keys and policies (``app.cache``) never serve a stale answer: the
triggers of migration 0007 bump a counter with every change, and the next request sees it —
in this process and in any other."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, select, text, update
from sqlalchemy.orm import Session

from app.auth.service import create_key, revoke_key
from app.db import Database
from app.models import ApiKey, CacheGeneration, Policy, Snapshot
from tests.conftest import api_process, bearer, make_settings


def trace(ext: str, policy: str, content: str = "Patient note") -> dict[str, object]:
    return {"external_id": ext, "policy": policy,
            "messages": [{"role": "user", "content": content}], "response": "ANSWER: YES"}


def counters(database: Database) -> dict[str, int]:
    with database.session() as session:
        return dict(session.execute(
            select(CacheGeneration.name, CacheGeneration.generation)).tuples().all())


def test_every_change_to_keys_and_policies_bumps_its_counter_and_snapshot_status_does_not(
    database: Database, tenant: str, client: TestClient, admin_headers: dict[str, str],
    policy_name: str,
) -> None:
    def bumped(change: Callable[[Session], object]) -> set[str]:
        before = counters(database)
        with database.session() as session:
            change(session)
        after = counters(database)
        return {name for name in after if after[name] != before[name]}

    created: list[int] = []
    assert bumped(lambda s: created.append(create_key(s, tenant, "ingest").id)) == {"api_keys"}
    assert bumped(lambda s: revoke_key(s, created[0])) == {"api_keys"}
    assert bumped(lambda s: s.execute(update(ApiKey).where(ApiKey.id == created[0])
                                      .values(scopes=["read"]))) == {"api_keys"}
    assert bumped(lambda s: s.execute(update(Policy).where(Policy.name == policy_name)
                                      .values(redaction_enabled=False))) == {"policies"}
    with database.session() as session:
        snapshot_id = session.scalar(select(Snapshot.id).join(Policy, Policy.id == Snapshot.policy_id)
                                     .where(Policy.name == policy_name))
    assert snapshot_id is not None
    assert bumped(lambda s: s.execute(update(Snapshot).where(Snapshot.id == snapshot_id)
                                      .values(status_reason="x"))) == set()
    assert bumped(lambda s: s.execute(update(Snapshot).where(Snapshot.id == snapshot_id)
                                      .values(served_name=f"{policy_name}-v9"))) == {"policies"}


def test_a_revoked_key_is_refused_on_the_very_next_request(
    client: TestClient, database: Database, tenant: str, policy_name: str,
    make_key: Callable[..., str],
) -> None:
    key = make_key(tenant, "ingest,read")
    assert client.post("/v1/traces", json=trace("a", policy_name),
                       headers=bearer(key)).status_code == 201  # the key is cached now
    with database.session() as session:
        key_id = session.scalar(select(ApiKey.id).where(ApiKey.prefix == key.split("_")[1]))
        assert key_id is not None
        revoke_key(session, key_id)
    r = client.post("/v1/traces", json=trace("b", policy_name), headers=bearer(key))
    assert r.status_code == 401, r.text


def test_a_scope_taken_away_is_refused_on_the_very_next_request(
    client: TestClient, database: Database, tenant: str, policy_name: str,
    make_key: Callable[..., str],
) -> None:
    key = make_key(tenant, "ingest,read")
    assert client.post("/v1/traces", json=trace("a", policy_name),
                       headers=bearer(key)).status_code == 201
    with database.session() as session:
        session.execute(update(ApiKey).where(ApiKey.prefix == key.split("_")[1])
                        .values(scopes=["read"]))
    assert client.post("/v1/traces", json=trace("b", policy_name),
                       headers=bearer(key)).status_code == 403


def test_a_policy_change_is_seen_by_the_next_ingest(
    client: TestClient, admin_headers: dict[str, str], policy_name: str
) -> None:
    note = "write to jane.doe@example.com"
    first = client.post("/v1/traces", json=trace("r1", policy_name, note), headers=admin_headers)
    assert first.status_code == 201, first.text
    patched = client.patch(f"/v1/policies/{policy_name}", json={"redaction_enabled": False},
                           headers=admin_headers)
    assert patched.status_code == 200, patched.text
    second = client.post("/v1/traces", json=trace("r2", policy_name, note), headers=admin_headers)
    stored = [client.get(f"/v1/traces/{r.json()['id']}", headers=admin_headers).json()
              for r in (first, second)]
    assert "jane.doe@example.com" not in stored[0]["messages"][0]["content"]
    assert stored[1]["messages"][0]["content"] == note


def test_a_policy_created_after_an_unknown_name_was_cached_is_found(
    client: TestClient, admin_headers: dict[str, str]
) -> None:
    name = f"p-{uuid.uuid4().hex[:10]}"
    assert client.post("/v1/traces", json=trace("u1", name),
                       headers=admin_headers).status_code == 422
    assert client.post("/v1/policies", json={"name": name},
                       headers=admin_headers).status_code == 201
    assert client.post("/v1/traces", json=trace("u1", name),
                       headers=admin_headers).status_code == 201


def test_the_triggers_survive_to_head(database: Database) -> None:
    with database.session() as session:
        if session.get_bind().dialect.name == "postgresql":
            names = session.scalars(text(
                "SELECT tgname FROM pg_trigger WHERE tgname LIKE '%bump_cache%'")).all()
        else:
            names = session.scalars(text(
                "SELECT name FROM sqlite_master WHERE type = 'trigger'"
                " AND name LIKE '%bump_cache%'")).all()
    assert {n.split("_bump_cache")[0] for n in names} == {"api_keys", "policies", "snapshots", "tenants"}


@pytest.mark.timeout(180)
def test_revocation_and_a_policy_change_reach_another_api_process_on_its_next_request(
    pg_url: str, tenant: str, tmp_path: Path,
) -> None:
    database = Database(make_settings(pg_url, tmp_path / "data"))
    env = {"TRACELEARN_DATABASE_URL": pg_url, "TRACELEARN_DATA_DIR": str(tmp_path / "data"),
           "TRACELEARN_LOG_LEVEL": "WARNING", "TRACELEARN_RATE_LIMIT_PER_MINUTE": "0"}
    with database.session() as session:
        admin = create_key(session, tenant, "ingest,read,admin")
        ingest = create_key(session, tenant, "ingest")
    policy, note = f"p-{uuid.uuid4().hex[:10]}", "write to jane.doe@example.com"
    with api_process(env, tmp_path / "a.log") as url_a, \
            api_process(env, tmp_path / "b.log") as url_b, \
            httpx.Client(base_url=url_a, headers=bearer(admin.secret), timeout=30) as a_admin, \
            httpx.Client(base_url=url_b, headers=bearer(admin.secret), timeout=30) as b_admin:
        assert a_admin.post("/v1/policies", json={"name": policy}).status_code == 201
        # B caches the policy (redacting) and both processes cache the ingest key.
        assert b_admin.post("/v1/traces", json=trace("r1", policy, note)).status_code == 201
        assert a_admin.patch(f"/v1/policies/{policy}",
                             json={"redaction_enabled": False}).status_code == 200
        r2 = b_admin.post("/v1/traces", json=trace("r2", policy, note))
        assert r2.status_code == 201, r2.text
        stored = b_admin.get(f"/v1/traces/{r2.json()['id']}").json()
        assert stored["messages"][0]["content"] == note

        for i, url in enumerate((url_a, url_b)):
            with httpx.Client(base_url=url, headers=bearer(ingest.secret), timeout=30) as c:
                assert c.post("/v1/traces", json=trace(f"w{i}", policy)).status_code == 201
        # Revoked through neither: a third process (this one), as the CLI would.
        with database.session() as session:
            revoke_key(session, ingest.id)
        for i, url in enumerate((url_a, url_b)):
            with httpx.Client(base_url=url, headers=bearer(ingest.secret), timeout=30) as c:
                r = c.post("/v1/traces", json=trace(f"x{i}", policy))
                assert r.status_code == 401, r.text
    database.dispose()


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_warm_request_reads_the_counters_in_one_autocommit_statement_and_nothing_else(
    database: Database, client: TestClient, admin_headers: dict[str, str], policy_name: str,
) -> None:
    """On Postgres an authenticated request with warm caches makes one round trip for auth: the
    counters, outside any transaction (no BEGIN, no COMMIT), and the key lookup only on a miss."""
    seen: list[tuple[str, bool]] = []

    def record(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        seen.append((statement, conn.connection.dbapi_connection.autocommit))

    assert client.get("/v1/policies", headers=admin_headers).status_code == 200  # warms the caches
    event.listen(database.engine, "before_cursor_execute", record)
    try:
        assert client.get("/v1/policies", headers=admin_headers).status_code == 200
    finally:
        event.remove(database.engine, "before_cursor_execute", record)
    reads = [(s, auto) for s, auto in seen if "cache_generations" in s]
    assert len(reads) == 1 and reads[0][1] is True, seen
    assert not any("api_keys" in s for s, _ in seen), seen
    # Whatever the route itself ran came after, in the usual transactional mode.
    assert all(auto is False for s, auto in seen if "cache_generations" not in s), seen
