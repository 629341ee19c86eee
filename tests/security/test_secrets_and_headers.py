"""What must never leak: keys and trace contents in logs, PII in stored rows; and the headers every
response carries."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.auth.service import revoke_key
from app.db import Database
from app.models import ApiKey
from app.settings import Settings
from tests.conftest import api_process as start_api

from ._helpers import trace_body
from .routes import operations


@pytest.fixture
def db_url(pg_url: str) -> str:
    return pg_url


@pytest.fixture
def api_process(settings: Settings, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`tracelearn api` as production runs it, at DEBUG, its output captured to a file."""
    log_path = tmp_path / "api.log"
    env = {
        "TRACELEARN_DATABASE_URL": settings.resolved_database_url,
        "TRACELEARN_DATA_DIR": str(tmp_path / "data"),
        "TRACELEARN_LOG_LEVEL": "DEBUG",
        "TRACELEARN_RATE_LIMIT_PER_MINUTE": "30",
    }
    with start_api(env, log_path) as url:
        yield url, log_path


def test_keys_and_trace_contents_never_reach_the_logs(
    api_process: tuple[str, Path], make_key: Callable[..., str], tenant: str, database: Database
) -> None:
    url, log_path = api_process
    key = make_key(tenant, "ingest,read,admin")
    weak = make_key(tenant, "read")
    revoked = make_key(tenant, "ingest")
    with database.session() as s:
        row = s.scalars(select(ApiKey).where(ApiKey.prefix == revoked.split("_")[1])).one()
        revoke_key(s, row.id)
    marker = f"CONTENT-{uuid.uuid4().hex}"
    policy = f"p-{uuid.uuid4().hex[:8]}"
    h = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/v1/policies", json={"name": policy}, headers=h).status_code == 201
        body = trace_body("e1", policy, f"{marker} jane.doe@example.org",
                          metadata={"note": marker}, outcome={"name": "o", "value": marker[:100]})
        assert c.post("/v1/traces", json=body, headers=h).status_code == 201
        assert c.post("/v1/traces", json=body, headers=h).status_code == 200  # duplicate
        other = trace_body("e1", policy, f"{marker} changed")
        assert c.post("/v1/traces", json=other, headers=h).status_code == 409
        bad = {**trace_body("e2", policy, marker), "messages": marker}
        assert c.post("/v1/traces", json=bad, headers=h).status_code == 422
        assert c.post("/v1/traces", json={"traces": [bad, body]}, headers=h).status_code == 207
        not_json = repr(trace_body("e3", policy, marker))  # Python repr: a parse error
        assert c.post("/v1/traces", content=not_json,
                      headers={**h, "content-type": "application/json"}).status_code == 422
        fb = {"outcomes": [{"trace_external_id": "e1", "name": "late", "value": marker[:100]}]}
        assert c.post("/v1/feedback", json=fb, headers=h).status_code == 207
        assert c.get("/v1/traces", headers=h).status_code == 200
        assert c.post("/v1/traces", json=body,
                      headers={"Authorization": f"Bearer {weak}"}).status_code == 403
        assert c.post("/v1/traces", json=body,
                      headers={"Authorization": f"Bearer {revoked}"}).status_code == 401
        assert c.post("/v1/traces", json=body,
                      headers={"Authorization": f"Bearer {key}x"}).status_code == 401
        statuses = {c.get("/v1/traces", headers=h).status_code for _ in range(40)}
        assert 429 in statuses  # the rate limiter's refusal path ran too
    time.sleep(0.3)
    logs = log_path.read_text(errors="replace")
    for secret in (key, weak, revoked, key.split("_", 2)[2], revoked.split("_", 2)[2]):
        assert secret not in logs, "an API key reached the logs"
    for content in (marker, "jane.doe@example.org"):
        assert content not in logs, "trace content reached the logs"


def test_pii_is_redacted_in_the_stored_rows(
    client: TestClient, admin_headers: dict[str, str], policy_name: str, tenant: str,
    settings: Settings,
) -> None:
    pii = {
        "EMAIL": "maria.gonzalez@hospital.example.com",
        "PHONE": "(617) 555-0199",
        "SSN": "078-05-1120",
        "MRN": "MRN: 7730021",
        "DOB": "DOB: 1956-02-29",
    }
    narrative = (
        f"72-year-old woman with stage IV NSCLC, {pii['DOB']}, {pii['MRN']}. Daughter reachable at "
        f"{pii['PHONE']} or {pii['EMAIL']}; SSN {pii['SSN']} on the intake form. ECOG 2, EGFR+."
    )
    single = trace_body("pii-1", policy_name, narrative, metadata={
        "referrer": {"contact": pii["EMAIL"], "history": [f"called {pii['PHONE']}"]},
    })
    single["messages"].insert(0, {"role": "system", "content": f"Chart {pii['MRN']}"})
    single["messages"].append({"role": "assistant", "content": f"Noted {pii['SSN']}"})
    single["response"] = f"Will call {pii['PHONE']}. ANSWER: NO"
    assert client.post("/v1/traces", json=single, headers=admin_headers).status_code == 201
    batch = {"traces": [trace_body(f"pii-b{i}", policy_name, narrative) for i in range(3)]}
    assert client.post("/v1/traces", json=batch, headers=admin_headers).status_code == 207
    dsn = settings.resolved_database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT t::text, redactions FROM traces t WHERE tenant = %s", (tenant,)
        ).fetchall()
    assert len(rows) == 4
    for text, redactions in rows:
        for kind, value in pii.items():
            raw = value.split(": ", 1)[-1]
            assert raw not in text, f"{kind} stored in clear"
        assert "ECOG 2" in text and "NSCLC" in text  # the clinical content survives
        assert set(redactions) == set(pii)
        assert f"[{'EMAIL'}]" in text


def test_security_headers_on_every_kind_of_response(
    client: TestClient, admin_headers: dict[str, str], policy_name: str
) -> None:
    responses = {
        "ok": client.get("/v1/traces", headers=admin_headers),
        "created": client.post("/v1/traces", json=trace_body("h", policy_name),
                               headers=admin_headers),
        "health": client.get("/healthz"),
        "metrics": client.get("/metrics"),
        "unauthorized": client.get("/v1/traces"),
        "not-found": client.get("/v1/nowhere", headers=admin_headers),
        "method": client.put("/v1/traces", headers=admin_headers),
        "too-deep": client.post("/v1/traces", content=b"[" * 100 + b"]" * 100,
                                headers={**admin_headers, "content-type": "application/json"}),
        "too-large": client.post("/v1/traces", content=b"x" * 6_000_000,
                                 headers={**admin_headers, "content-type": "application/json"}),
    }
    if any(o.path == "/dashboard/login" for o in operations(client.app)):  # type: ignore[arg-type]
        responses["dashboard-login"] = client.get("/dashboard/login")
        responses["dashboard-redirect"] = client.get("/dashboard", follow_redirects=False)
    for name, r in responses.items():
        assert r.status_code < 500, name
        assert r.headers.get("x-content-type-options") == "nosniff", name
        assert r.headers.get("x-frame-options") == "DENY", name
        assert r.headers.get("referrer-policy") == "no-referrer", name
        csp = r.headers.get("content-security-policy", "")
        assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp, name
        assert "server" not in {k.lower() for k in r.headers if r.headers[k].startswith("uvicorn")}


def test_error_bodies_do_not_echo_the_key_or_the_input(
    client: TestClient, admin_headers: dict[str, str], policy_name: str
) -> None:
    key = admin_headers["Authorization"].split(" ", 1)[1]
    marker = f"ECHO-{uuid.uuid4().hex}"
    bad = {**trace_body("x", policy_name, marker), "response": {"v": marker}}
    for r in (
        client.post("/v1/traces", json=bad, headers=admin_headers),
        client.post("/v1/traces", json={"traces": [bad]}, headers=admin_headers),
        client.post("/v1/feedback", json={"outcomes": [{"name": marker}]}, headers=admin_headers),
        client.get("/v1/traces", headers={"Authorization": f"Bearer {key}x"}),
    ):
        assert marker not in r.text and key not in r.text, r.text[:300]
