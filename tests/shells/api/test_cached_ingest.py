"""Single-trace POSTs admitted from the process caches (``CachedSingleTraceIngest`` in
``app.traces.endpoints``): on Postgres a warm request is stored without the route, and
everything the caches cannot vouch for — a key revoked since, a scope taken away, a cold
process, a rate limit — is answered by the route exactly as before."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.auth.service import revoke_key
from app.db import Database
from app.main import create_app
from app.models import ApiKey, Trace
from app.settings import Settings, set_settings
from app.traces import endpoints, group_commit
from tests.conftest import bearer


def trace(ext: str, policy: str, content: str = "Patient note") -> dict[str, object]:
    return {"external_id": ext, "policy": policy,
            "messages": [{"role": "user", "content": content}], "response": "ANSWER: YES"}


class Calls:
    """What ``admit_cached`` and ``write_cached`` gave, request by request."""

    def __init__(self) -> None:
        self.admitted: list[bool] = []
        self.written: list[str | None] = []


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[Calls]:
    seen = Calls()
    admit, write = group_commit.admit_cached, group_commit.write_cached

    def admit_spy(*args: Any) -> Any:
        found = admit(*args)
        seen.admitted.append(found is not None)
        return found

    async def write_spy(*args: Any) -> Any:
        result = await write(*args)
        seen.written.append(None if result is None else result.status.value)
        return result

    monkeypatch.setattr(group_commit, "admit_cached", admit_spy)
    monkeypatch.setattr(group_commit, "write_cached", write_spy)
    yield seen


@pytest.fixture(params=["postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Postgres, whose group writer the cached path writes through; ``sqlite`` where asked."""
    return str(request.getfixturevalue("pg_url" if request.param == "postgres" else "sqlite_url"))


def stored(database: Database, tenant: str) -> int:
    with database.session() as session:
        return int(session.scalar(select(func.count()).where(Trace.tenant == tenant)) or 0)


def test_a_warm_single_trace_is_stored_from_the_caches_and_answered_as_the_route_would(
    client: TestClient, admin_headers: dict[str, str], policy_name: str, tenant: str,
    database: Database, calls: Calls,
) -> None:
    cold = client.post("/v1/traces", json=trace("a", policy_name), headers=admin_headers)
    assert cold.status_code == 201, cold.text  # the route's, filling the caches
    new = client.post("/v1/traces", json=trace("b", policy_name), headers=admin_headers)
    again = client.post("/v1/traces", json=trace("b", policy_name), headers=admin_headers)
    other = client.post("/v1/traces", json=trace("b", policy_name, "other"),
                        headers=admin_headers)
    assert (new.status_code, again.status_code, other.status_code) == (201, 200, 409)
    assert calls.written == ["created", "duplicate", "conflict"]
    assert new.headers["content-type"] == "application/json"
    assert new.json()["status"] == "created" and again.json()["id"] == new.json()["id"]
    assert other.headers["content-type"] == "application/problem+json"
    assert other.headers["x-content-type-options"] == "nosniff"  # the middleware still wraps
    assert stored(database, tenant) == 2
    metrics = client.get("/metrics").text
    assert 'route="/v1/traces",status="201"' in metrics  # filed under the route's template


def revoke(session: Session, prefix: str) -> None:
    key_id = session.scalar(select(ApiKey.id).where(ApiKey.prefix == prefix))
    assert key_id is not None
    revoke_key(session, key_id)


def take_ingest_away(session: Session, prefix: str) -> None:
    session.execute(update(ApiKey).where(ApiKey.prefix == prefix).values(scopes=["read"]))


@pytest.mark.parametrize(("change", "status"), [(revoke, 401), (take_ingest_away, 403)])
def test_a_key_changed_after_it_was_cached_is_held_back_at_the_write_and_refused(
    client: TestClient, database: Database, tenant: str, policy_name: str,
    make_key: Callable[..., str], calls: Calls, change: Callable[[Session, str], None],
    status: int,
) -> None:
    key = make_key(tenant, "ingest,read")
    for ext in ("a", "b"):
        assert client.post("/v1/traces", json=trace(ext, policy_name),
                           headers=bearer(key)).status_code == 201
    assert calls.written == ["created"]  # "b", from the caches
    with database.session() as session:
        change(session, key.split("_")[1])
    r = client.post("/v1/traces", json=trace("c", policy_name), headers=bearer(key))
    assert r.status_code == status, r.text
    # Admitted from the stale cache, then held back by the counters read with the insert.
    assert calls.written == ["created", None]
    assert stored(database, tenant) == 2


def test_a_warm_keys_context_is_read_once_per_counters_and_kept_without_the_key(
    client: TestClient, admin_headers: dict[str, str], policy_name: str, tenant: str,
    database: Database, make_key: Callable[..., str], calls: Calls,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads: list[str] = []
    read = group_commit._read_context

    def read_spy(*args: Any) -> Any:
        reads.append(args[2]["external_id"])
        return read(*args)

    monkeypatch.setattr(group_commit, "_read_context", read_spy)
    group_commit.warm_contexts.clear()

    def post(*exts: str) -> list[int]:
        return [client.post("/v1/traces", json=trace(ext, policy_name),
                            headers=admin_headers).status_code for ext in exts]

    assert post("a", "b", "c", "d") == [201] * 4
    # "a" found the caches cold and went to the route; "b" read the context, "c" and "d"
    # reused it.
    assert reads == ["a", "b"] and calls.written == ["created"] * 3
    make_key(tenant, "read")  # a key created: the counters move
    assert post("e", "f", "g", "h") == [201] * 4
    # "e" came from the context of the old counters and was held back at the write (the route
    # stored it, reading the new counters); "f" read the context again under them, "g" and
    # "h" reused it, and so do "i" and "j".
    assert post("i", "j") == [201, 201]
    assert reads == ["a", "b", "f"]
    assert calls.written == ["created"] * 3 + [None] + ["created"] * 5
    assert stored(database, tenant) == 10
    key = admin_headers["Authorization"].split()[1]
    held = group_commit.warm_contexts._held
    assert held is not None and held.by_request
    assert all(key not in str(request) for request in held.by_request)
    # A policy that is not a name is not kept (nor a reason to fail): the route refuses it.
    odd = client.post("/v1/traces", json=trace("k", policy_name) | {"policy": ["x"]},
                      headers=admin_headers)
    assert odd.status_code == 422, odd.text


def test_what_the_caches_cannot_vouch_for_goes_to_the_route(
    client: TestClient, admin_headers: dict[str, str], policy_name: str,
    make_key: Callable[..., str], tenant: str, calls: Calls,
) -> None:
    assert client.post("/v1/traces", json=trace("a", policy_name),
                       headers=admin_headers).status_code == 201
    calls.admitted.clear()
    read_only = bearer(make_key(tenant, "read"))
    answers = [
        client.post("/v1/traces", json=trace("b", policy_name), headers=read_only),
        client.post("/v1/traces", json=trace("c", "no-such-policy"), headers=admin_headers),
        client.post("/v1/traces", json={"external_id": "d"}, headers=admin_headers),
        client.post("/v1/traces", json={"traces": [trace("e", policy_name)]},
                    headers=admin_headers),
        client.post("/v1/traces", content=b"[1]", headers=admin_headers
                    | {"content-type": "application/json"}),
        client.post("/v1/traces", content=b"{", headers=admin_headers
                    | {"content-type": "application/json"}),
        client.post("/v1/traces", json=trace("f", policy_name),
                    headers={"authorization": "Bearer tl_nope_nope"}),
        client.post("/v1/traces", json=trace("g", policy_name,
                                             "x" * endpoints.LARGEST_BODY),
                    headers=admin_headers),
    ]
    assert [r.status_code for r in answers] == [403, 422, 422, 207, 422, 422, 401, 201]
    # A key not cached yet (the new one; then the admin key, its cache emptied by the new
    # key's counter; an unknown one) and an invalid trace were handed over at admission; a
    # batch, a body that is not an object, one that is not JSON and one over the size the
    # event loop admits never got there.
    assert calls.admitted == [False, False, False, False]
    assert calls.written == []


def test_what_the_body_limits_refuse_they_refuse_on_a_warm_path_too(
    client: TestClient, settings: Settings, admin_headers: dict[str, str], policy_name: str,
    calls: Calls,
) -> None:
    assert client.post("/v1/traces", json=trace("a", policy_name),
                       headers=admin_headers).status_code == 201  # warms the caches
    calls.admitted.clear()
    nested: dict[str, object] = {}
    for _ in range(settings.max_json_depth + 2):
        nested = {"x": nested}
    deep = client.post("/v1/traces", json=trace("b", policy_name) | {"metadata": nested},
                       headers=admin_headers)
    queried = client.post("/v1/traces?note=1", json=trace("c", policy_name),
                          headers=admin_headers)
    with TestClient(create_app(settings.model_copy(update={"max_body_bytes": 1024}))) as small:
        large = small.post("/v1/traces", json=trace("d", policy_name, "x" * 1100),
                           headers=admin_headers)
    assert (deep.status_code, queried.status_code, large.status_code) == (400, 201, 413)
    assert deep.json()["type"].endswith("json-too-deep")
    assert large.json()["type"].endswith("payload-too-large")
    assert large.headers["x-content-type-options"] == "nosniff"
    # None of them was admitted here: the limits answered two, the route the third.
    assert calls.admitted == [] and calls.written == []


def test_a_rate_limit_reached_is_answered_by_the_route(
    client: TestClient, settings: Settings, admin_headers: dict[str, str], policy_name: str,
    calls: Calls,
) -> None:
    set_settings(settings.model_copy(update={"rate_limit_per_minute": 3}))
    try:
        codes = [client.post("/v1/traces", json=trace(f"r{i}", policy_name),
                             headers=admin_headers).status_code for i in range(4)]
    finally:
        set_settings(settings)
    assert codes == [201, 201, 201, 429]
    # The first by the route (the new policy was not cached yet), the next two from the
    # caches, the last refused by the route: the bucket held three tokens.
    assert calls.written == ["created", "created"]


def test_a_request_held_back_at_the_write_costs_one_token_not_two(
    client: TestClient, settings: Settings, admin_headers: dict[str, str], policy_name: str,
    tenant: str, make_key: Callable[..., str], calls: Calls,
) -> None:
    set_settings(settings.model_copy(update={"rate_limit_per_minute": 3}))
    try:
        codes = [client.post("/v1/traces", json=trace(f"h{i}", policy_name),
                             headers=admin_headers).status_code for i in range(2)]
        make_key(tenant)  # a key created: the counters move, the cached keys are stale
        codes += [client.post("/v1/traces", json=trace(f"h{i}", policy_name),
                              headers=admin_headers).status_code for i in range(2, 4)]
    finally:
        set_settings(settings)
    # The route's, the caches', then one held back at the write and admitted by the route
    # (one token, given back by the cached path), then the bucket is empty.
    assert calls.written == ["created", None]
    assert codes == [201, 201, 201, 429]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sqlite_keeps_the_route(
    client: TestClient, admin_headers: dict[str, str], policy_name: str, calls: Calls,
) -> None:
    for ext in ("a", "b"):
        assert client.post("/v1/traces", json=trace(ext, policy_name),
                           headers=admin_headers).status_code == 201
    assert calls.admitted == [] and calls.written == []


def test_the_bearer_key_is_read_only_from_a_json_request() -> None:
    def scope(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
        return {"headers": list(headers)}

    json_type = (b"content-type", b"application/json; charset=utf-8")
    assert endpoints._bearer_key(scope(json_type, (b"authorization", b"Bearer tl_a_b"))
                                     ) == "tl_a_b"
    assert endpoints._bearer_key(scope(json_type, (b"authorization", b"bearer  tl_a_b "))
                                     ) == "tl_a_b"
    assert endpoints._bearer_key(scope(json_type, (b"authorization", b"Basic eA=="))) is None
    assert endpoints._bearer_key(scope(json_type, (b"authorization", b"Bearer "))) is None
    assert endpoints._bearer_key(scope((b"content-type", b"text/plain"),
                                           (b"authorization", b"Bearer tl_a_b"))) is None
    assert endpoints._bearer_key(scope((b"authorization", b"Bearer tl_a_b"))) is None
