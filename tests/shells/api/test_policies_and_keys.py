from __future__ import annotations

from sqlalchemy import select
from typer.testing import CliRunner

from app.cli import cli
from app.models import ApiKey
from tests.conftest import bearer


def test_policy_creation_makes_v0_serving(client, admin_headers):
    r = client.post(
        "/v1/policies",
        json={"name": "onc-a1", "group_size": 4, "schedule": "*/5 * * * *"},
        headers=admin_headers,
    )
    assert r.status_code == 201, r.text
    assert r.json()["serving_snapshot"] == "onc-a1-v0"
    again = client.post("/v1/policies", json={"name": "onc-a1"}, headers=admin_headers)
    assert again.status_code == 409


def test_invalid_policy_fields_are_422(client, admin_headers):
    for body in (
        {"name": "Bad Name"},
        {"name": "ok-1", "schedule": "not cron"},
        {"name": "ok-2", "group_size": 0},
        {"name": "ok-3", "sampling": {"top_p": 0.9}},
    ):
        r = client.post("/v1/policies", json=body, headers=admin_headers)
        assert r.status_code == 422, body


def test_ingest_scope_cannot_create_policies(client, make_key, tenant):
    r = client.post(
        "/v1/policies", json={"name": "x-1"}, headers=bearer(make_key(tenant, "ingest"))
    )
    assert r.status_code == 403


def test_revoked_key_stops_working_at_once(client, make_key, tenant, database):
    key = make_key(tenant, "read")
    assert client.get("/v1/traces", headers=bearer(key)).status_code == 200
    with database.session() as s:
        row = s.scalars(select(ApiKey).where(ApiKey.tenant == tenant)).one()
        key_id = row.id
    result = CliRunner().invoke(cli, ["keys", "revoke", str(key_id)])
    assert result.exit_code == 0, result.output
    assert client.get("/v1/traces", headers=bearer(key)).status_code == 401


def test_cli_creates_a_key_that_is_stored_hashed(settings, database, client):
    result = CliRunner().invoke(
        cli, ["keys", "create", "--tenant", "cli-t", "--scopes", "ingest,read"]
    )
    assert result.exit_code == 0, result.output
    secret = result.output.strip().splitlines()[-1]
    assert secret.startswith("tl_")
    with database.session() as s:
        rows = s.scalars(select(ApiKey).where(ApiKey.tenant == "cli-t")).all()
        assert len(rows) == 1 and secret not in (rows[0].key_hash, rows[0].prefix)
    assert client.get("/v1/traces", headers=bearer(secret)).status_code == 200


def test_cli_refuses_unknown_scope(settings, database):
    result = CliRunner().invoke(cli, ["keys", "create", "--tenant", "t", "--scopes", "root"])
    assert result.exit_code == 2
    assert "unknown scope" in result.output
