"""Every route is guarded: walked from the app's own route table, so a route added tomorrow is
checked tomorrow without anyone remembering to add it here."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from app.auth.service import Scope
from app.dependencies import get_session
from app.main import create_app
from app.proxy.endpoints import OPENAI_PATHS
from app.receivers.otlp.endpoints import OTLP_PATHS
from app.settings import Settings

from ._helpers import assert_problem
from .routes import api_operations, operations, walk


@pytest.fixture
def db_url(pg_url: str) -> str:
    # Authorization does not depend on the dialect; Postgres is the production one.
    return pg_url


def test_the_route_table_is_not_empty_and_covers_the_ingest_api(settings: Settings) -> None:
    paths = {(o.method, o.path) for o in api_operations(create_app(settings))}
    assert {("POST", "/v1/traces"), ("POST", "/v1/feedback"), ("GET", "/v1/traces/{trace_id}"),
            ("DELETE", "/v1/traces/{trace_id}"), ("POST", "/v1/policies")} <= paths


def test_every_api_route_requires_a_scope(settings: Settings) -> None:
    unguarded = [f"{o.method} {o.path}" for o in api_operations(create_app(settings))
                 if o.required_scope is None]
    assert unguarded == [], "routes without a require(Scope.…) dependency"


def test_every_mutating_route_needs_more_than_read(settings: Settings) -> None:
    weak = [f"{o.method} {o.path}" for o in api_operations(create_app(settings))
            if o.method in {"POST", "PUT", "PATCH", "DELETE"} and o.required_scope is Scope.read]
    assert weak == []


def test_every_route_commits_before_it_answers(settings: Settings) -> None:
    """A session dependency with FastAPI's default scope commits after the response is sent: a
    failed commit would then leave a client holding a 2xx for data that was never stored."""
    late = []
    for op in operations(create_app(settings)):
        route = op.route
        dependant = getattr(route, "dependant", None)
        if dependant is None:
            continue
        for dep in walk(dependant):
            if dep.call is get_session and dep.scope != "function":
                late.append(f"{op.method} {op.path}")
    assert sorted(set(late)) == [], (
        'use Depends(get_session, scope="function") on these routes'
    )


def test_every_api_route_answers_401_without_a_valid_key(
    client: TestClient, make_key: Callable[..., str], tenant: str, database: object
) -> None:
    from app.auth.service import revoke_key
    from app.db import get_database
    from app.models import ApiKey

    revoked = make_key(tenant, "ingest,read,admin")
    with get_database().session() as session:
        row = session.query(ApiKey).filter(ApiKey.prefix == revoked.split("_")[1]).one()
        revoke_key(session, row.id)
    bad_headers: list[dict[str, str]] = [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer tl_nope_nope"},
        {"Authorization": "Bearer not-a-key-at-all"},
        {"Authorization": f"Bearer {revoked[:-1]}x"},  # right prefix, wrong secret
        {"Authorization": f"Bearer {revoked}"},  # revoked
        {"Authorization": f"Token {make_key(tenant, 'admin')}"},  # a valid key, wrong scheme
    ]
    ops = api_operations(client.app)  # type: ignore[arg-type]
    for op in ops:
        for headers in bad_headers:
            r = client.request(op.method, op.url(), headers=headers,
                               json={} if op.method in {"POST", "PUT", "PATCH"} else None)
            assert r.status_code == 401, (op.method, op.path, headers, r.status_code, r.text)
            if op.path.startswith(OPENAI_PATHS):
                assert r.json()["error"]["type"] == "authentication_error", r.text
                continue
            if op.path.startswith(OTLP_PATHS):  # OTLP/HTTP: a google.rpc.Status, UNAUTHENTICATED
                assert r.json()["code"] == 16, r.text
                continue
            assert assert_problem(r, 401)["type"].endswith("/unauthorized")


def test_every_api_route_answers_403_to_a_key_lacking_its_scope(
    client: TestClient, make_key: Callable[..., str], tenant: str
) -> None:
    keys: dict[Scope, str] = {}
    for op in api_operations(client.app):  # type: ignore[arg-type]
        needed = op.required_scope
        assert needed is not None, op
        others = sorted(s.value for s in Scope if s not in (needed, Scope.admin))
        if needed not in keys:
            keys[needed] = make_key(tenant, ",".join(others))
        r = client.request(op.method, op.url(), headers={"Authorization": f"Bearer {keys[needed]}"},
                           json={} if op.method in {"POST", "PUT", "PATCH"} else None)
        assert r.status_code == 403, (op.method, op.path, needed, r.status_code, r.text)
        if op.path.startswith(OPENAI_PATHS):
            assert r.json()["error"]["type"] == "permission_error", r.text
            continue
        if op.path.startswith(OTLP_PATHS):  # OTLP/HTTP: a google.rpc.Status, PERMISSION_DENIED
            assert r.json()["code"] == 7, r.text
            continue
        assert assert_problem(r, 403)["type"].endswith("/forbidden")


def test_dashboard_pages_need_a_session(client: TestClient) -> None:
    """Dashboard pages are session-protected, not key-protected: no session means a 401/403 or a
    redirect to the login page, never the page."""
    for op in operations(client.app):  # type: ignore[arg-type]
        if not op.is_dashboard or op.is_public:
            continue
        r = client.request(op.method, op.url(), follow_redirects=False,
                           data={} if op.method in {"POST", "PUT", "PATCH"} else None)
        if r.status_code in (301, 302, 303, 307, 308):
            assert "login" in r.headers.get("location", ""), (op.path, r.headers)
        else:
            assert r.status_code in (401, 403), (op.method, op.path, r.status_code)
        # A key is not a session: the API's bearer key must not open the dashboard either.


def test_public_routes_are_only_probes_metrics_and_docs(settings: Settings) -> None:
    public = sorted({o.path for o in operations(create_app(settings)) if o.is_public
                     and not o.is_dashboard})
    assert set(public) <= {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs",
                           "/docs/oauth2-redirect", "/redoc", "/favicon.ico"}
