"""Tenant A's key never sees or changes tenant B's data — on every route of the route table.

The sweep is generic: each route is called with A's all-scopes key and B's identifiers in its
path, its query and its body (a body built from the route's OpenAPI request schema). Afterwards B's
rows must be byte-for-byte what they were and no answer to A may carry B's content.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db import Database
from app.models import (
    ApiKey,
    AuditEvent,
    Evaluation,
    Outcome,
    Policy,
    RolloutGroup,
    RunStatus,
    Snapshot,
    SnapshotStatus,
    Trace,
    TrainingRun,
)

from ._helpers import trace_body
from .routes import Operation, api_operations


@pytest.fixture
def db_url(pg_url: str) -> str:
    return pg_url


@dataclass
class TenantB:
    tenant: str
    headers: dict[str, str]
    policy: str
    policy_id: int
    trace_id: int
    external_id: str
    snapshot_id: int
    candidate_id: int
    run_id: int
    marker: str  # appears only in B's stored content

    def path_values(self) -> dict[str, Any]:
        return {
            "trace_id": self.trace_id, "name": self.policy, "policy": self.policy,
            "snapshot_id": self.candidate_id, "run_id": self.run_id,
            "policy_name": self.policy, "external_id": self.external_id,
        }


def seed_tenant_b(client: TestClient, database: Database, make_key: Callable[..., str]) -> TenantB:
    tenant = f"b-{uuid.uuid4().hex[:8]}"
    marker = f"B-SECRET-{uuid.uuid4().hex}"
    headers = {"Authorization": f"Bearer {make_key(tenant, 'ingest,read,admin')}"}
    policy = f"pb-{uuid.uuid4().hex[:8]}"
    assert client.post("/v1/policies", json={"name": policy}, headers=headers).status_code == 201
    ext = f"b-ext-{uuid.uuid4().hex[:8]}"
    body = trace_body(ext, policy, f"note {marker}", metadata={"m": marker},
                      outcome={"name": "ok", "value": True})
    r = client.post("/v1/traces", json=body, headers=headers)
    assert r.status_code == 201, r.text
    trace_id = r.json()["id"]
    client.post("/v1/feedback", json={"outcomes": [
        {"trace_id": trace_id, "name": "late", "value": marker[:200]},
        {"trace_external_id": f"{ext}-later", "name": "pending", "value": 1},
    ]}, headers=headers)
    with database.session() as s:
        p = s.scalars(select(Policy).where(Policy.name == policy)).one()
        v0 = p.serving_snapshot_id
        assert v0 is not None
        run = TrainingRun(policy_id=p.id, algorithm="oapl", status=RunStatus.succeeded,
                          config={"marker": marker}, parent_snapshot_id=v0)
        s.add(run)
        s.flush()
        cand = Snapshot(policy_id=p.id, version=1, parent_id=v0, adapter_path=None,
                        served_name=f"{policy}-v1", status=SnapshotStatus.awaiting_approval,
                        training_run_id=run.id, manifest={"marker": marker})
        s.add(cand)
        s.flush()
        s.add(Evaluation(snapshot_id=cand.id, champion_snapshot_id=v0, dataset="heldout", n=1,
                         metrics={"marker": marker}))
        s.add(RolloutGroup(trace_id=trace_id, snapshot_id=v0, group_size=2, status="graded"))
        return TenantB(tenant, headers, policy, p.id, trace_id, ext, v0, cand.id, run.id, marker)


def state_of(database: Database, b: TenantB) -> str:
    """A digest of every row that belongs to B."""
    with database.session() as s:
        snaps = list(s.scalars(select(Snapshot.id).where(Snapshot.policy_id == b.policy_id)))
        queries = [
            select(ApiKey).where(ApiKey.tenant == b.tenant),
            select(Policy).where(Policy.tenant == b.tenant),
            select(Trace).where(Trace.tenant == b.tenant),
            select(Outcome).where(Outcome.tenant == b.tenant),
            select(AuditEvent).where(AuditEvent.tenant == b.tenant),
            select(Snapshot).where(Snapshot.policy_id == b.policy_id),
            select(TrainingRun).where(TrainingRun.policy_id == b.policy_id),
            select(Evaluation).where(Evaluation.snapshot_id.in_(snaps)),
            select(RolloutGroup).where(RolloutGroup.snapshot_id.in_(snaps)),
        ]
        h = hashlib.sha256()
        for q in queries:
            rows = s.scalars(q.order_by(q.selected_columns[0].table.c.id)).all()
            for row in rows:
                cols = row.__table__.columns
                h.update(repr(sorted((c.key, repr(getattr(row, c.key, None))) for c in cols
                                     if c.key != "last_used_at")).encode())
            h.update(f"|{len(rows)}|".encode())
        return h.hexdigest()


# ------------------------------------------------------------------ bodies from the OpenAPI schema


def example(schema: dict[str, Any], spec: dict[str, Any], hints: dict[str, Any],
            name: str = "", depth: int = 0) -> Any:
    """A small valid-looking instance of ``schema`` whose identifying fields point at B."""
    if depth > 8:
        return None
    if "$ref" in schema:
        ref = schema["$ref"].rsplit("/", 1)[-1]
        return example(spec["components"]["schemas"][ref], spec, hints, name, depth + 1)
    if name in hints:
        return hints[name]
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = [o for o in schema[key] if o.get("type") != "null"]
            return example(options[0], spec, hints, name, depth + 1) if options else None
    if "allOf" in schema:
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            merged.update(example(part, spec, hints, name, depth + 1) or {})
        return merged
    if "enum" in schema:
        return schema["enum"][0]
    if "default" in schema and schema["default"] is not None:
        return schema["default"]
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        return {k: example(v, spec, hints, k, depth + 1) for k, v in props.items()
                if k in schema.get("required", []) or k in hints}
    if kind == "array":
        item = example(schema.get("items", {}), spec, hints, name, depth + 1)
        return [item] * max(1, schema.get("minItems", 1))
    if kind == "integer":
        return max(1, schema.get("minimum", 1))
    if kind == "number":
        return 0.5
    if kind == "boolean":
        return True
    if kind == "string":
        if schema.get("format") == "date-time":
            return datetime.now(UTC).isoformat()
        return "x" * max(1, schema.get("minLength", 1))
    return {}


def bodies_for(op: Operation, spec: dict[str, Any], b: TenantB) -> list[Any]:
    hints = {
        "policy": b.policy, "name": b.policy, "external_id": b.external_id,
        "trace_external_id": b.external_id,
        "trace_id": b.trace_id, "snapshot_id": b.candidate_id, "run_id": b.run_id,
        "messages": [{"role": "user", "content": "A's attempt"}], "response": "r",
    }
    request_body = spec["paths"][op.path][op.method.lower()].get("requestBody")
    out: list[Any] = []
    if request_body:
        schema = request_body["content"].get("application/json", {}).get("schema", {})
        out.append(example(schema, spec, hints))
    # Known shapes whose schema is deliberately loose (items validated one by one).
    if op.path == "/v1/feedback":
        out.append({"outcomes": [
            {"trace_id": b.trace_id, "name": "late", "value": "overwritten by A"},
            {"trace_external_id": b.external_id, "name": "ok", "value": False},
            {"trace_external_id": f"{b.external_id}-later", "name": "pending", "value": 2},
        ]})
    if op.path == "/v1/traces" and op.method == "POST":
        out.append({"traces": [trace_body(b.external_id, b.policy, "A writes into B")]})
    return out or [None]


def test_tenant_a_never_sees_or_changes_tenant_b_on_any_route(
    client: TestClient, database: Database, make_key: Callable[..., str]
) -> None:
    b = seed_tenant_b(client, database, make_key)
    a_tenant = f"a-{uuid.uuid4().hex[:8]}"
    a = {"Authorization": f"Bearer {make_key(a_tenant, 'ingest,read,admin')}"}
    # A has data of its own, so list routes are not vacuously empty.
    a_policy = f"pa-{uuid.uuid4().hex[:8]}"
    assert client.post("/v1/policies", json={"name": a_policy}, headers=a).status_code == 201
    assert client.post("/v1/traces", json=trace_body("a-1", a_policy), headers=a).status_code == 201

    before = state_of(database, b)
    spec = client.app.openapi()  # type: ignore[attr-defined]
    unknown_params: set[str] = set()
    calls = 0
    for op in api_operations(client.app):  # type: ignore[arg-type]
        values = b.path_values()
        unknown_params |= set(op.params) - set(values)
        url = op.url(values)
        queries: list[dict[str, Any]] = [{}]
        declared = spec["paths"][op.path][op.method.lower()].get("parameters", [])
        if any(p["in"] == "query" and p["name"] == "policy" for p in declared):
            queries.append({"policy": b.policy})
        bodies = bodies_for(op, spec, b) if op.method in {"POST", "PUT", "PATCH"} else [None]
        for query in queries:
            for body in bodies:
                r = client.request(op.method, url, params=query, json=body, headers=a)
                calls += 1
                where = (op.method, url, query, body, r.status_code, r.text[:300])
                assert r.status_code < 500, where
                assert b.marker not in r.text, where
                if op.params:
                    # B's resource addressed by id or name: it does not exist for A.
                    assert r.status_code in (404, 422), where
                if op.method == "GET" and b.policy not in url and b.policy not in str(query):
                    assert b.external_id not in r.text and b.policy not in r.text, where
                if op.method == "GET" and query.get("policy") == b.policy and r.status_code == 200:
                    payload = r.json()
                    items = payload.get("items", payload) if isinstance(payload, dict) else payload
                    assert items == [], where
    assert unknown_params == set(), "teach TenantB.path_values about these path parameters"
    assert calls >= 20
    assert state_of(database, b) == before, "a request with A's key changed B's rows"
    # B still sees everything it had.
    r = client.get(f"/v1/traces/{b.trace_id}", headers=b.headers)
    assert r.status_code == 200 and b.marker in r.text
    assert {o["name"] for o in r.json()["outcomes"]} == {"ok", "late"}


def test_same_external_id_in_two_tenants_is_two_traces(
    client: TestClient, make_key: Callable[..., str], database: Database
) -> None:
    b = seed_tenant_b(client, database, make_key)
    a = {"Authorization": f"Bearer {make_key('a-' + uuid.uuid4().hex[:8], 'ingest,read,admin')}"}
    a_policy = f"pa-{uuid.uuid4().hex[:8]}"
    client.post("/v1/policies", json={"name": a_policy}, headers=a)
    r = client.post("/v1/traces", json=trace_body(b.external_id, a_policy, "A's own"), headers=a)
    assert r.status_code == 201 and r.json()["id"] != b.trace_id
    assert client.get(f"/v1/traces/{b.trace_id}", headers=b.headers).json()["messages"][0][
        "content"
    ].endswith(b.marker)


def test_revoked_key_is_refused_on_the_very_next_request(
    client: TestClient, make_key: Callable[..., str], tenant: str, database: Database
) -> None:
    from app.auth.service import revoke_key

    key = make_key(tenant, "ingest,read,admin")
    headers = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/traces", headers=headers).status_code == 200
    with database.session() as s:
        row = s.scalars(select(ApiKey).where(ApiKey.prefix == key.split("_")[1])).one()
        revoke_key(s, row.id)
    # No cache between the key table and the check: the next request is refused.
    for method, path in (("GET", "/v1/traces"), ("POST", "/v1/feedback")):
        r = client.request(method, path, headers=headers,
                           json={"outcomes": [{"trace_id": 1, "name": "n", "value": 1}]})
        assert r.status_code == 401, r.text
