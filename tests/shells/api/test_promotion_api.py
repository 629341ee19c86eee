"""Approve → promote → serve, every way promotion can fail, and rollback — through the HTTP API
with the in-process serving engine and real sha256-verified adapters."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from app.engines import set_engine_override
from app.models import AuditEvent, Snapshot, SnapshotStatus
from tests.conftest import bearer
from tests.support.seeding import CanaryFailsEngine, DownEngine, ForgetfulEngine


def _policy(client, headers, name):
    r = client.get(f"/v1/policies/{name}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def _statuses(client, headers, name):
    r = client.get(f"/v1/policies/{name}/snapshots", headers=headers)
    assert r.status_code == 200, r.text
    return {s["version"]: s["status"] for s in r.json()}


def test_approve_loads_the_adapter_and_flips_the_serving_pointer(
    client, admin_headers, policy_name, candidate, local_engine
):
    sid = candidate()
    r = client.post(f"/v1/snapshots/{sid}/approve", json={"comment": "looks good"},
                    headers=admin_headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["promoted"] is True
    assert body["snapshot"]["status"] == "serving" and body["snapshot"]["serving"] is True
    assert _policy(client, admin_headers, policy_name)["serving_snapshot"] == f"{policy_name}-v1"
    assert _statuses(client, admin_headers, policy_name) == {0: "retired", 1: "serving"}
    assert f"{policy_name}-v1" in local_engine.list_models()


def test_every_transition_of_a_promotion_is_audited_with_actor_and_reason(
    client, admin_headers, policy_name, candidate
):
    sid = candidate()
    client.post(f"/v1/snapshots/{sid}/approve", json={"comment": "ship it"},
                headers=admin_headers)
    r = client.get("/v1/audit-events", params={"entity_type": "snapshot", "entity_id": str(sid)},
                   headers=admin_headers)
    events = list(reversed(r.json()["items"]))
    assert [e["action"] for e in events] == [
        "snapshot.approved", "snapshot.deploying", "snapshot.serving"
    ]
    assert events[0]["reason"] == "ship it"
    assert events[0]["before"]["status"] == "awaiting_approval"
    assert events[0]["after"]["status"] == "approved"
    assert all(e["actor"].startswith("key:") for e in events)
    flips = client.get("/v1/audit-events", params={"action": "policy.serving_changed"},
                       headers=admin_headers).json()["items"]
    assert flips[0]["after"]["served_name"] == f"{policy_name}-v1"


def test_engine_down_marks_the_candidate_failed_and_keeps_the_champion(
    client, admin_headers, policy_name, candidate
):
    sid = candidate()
    set_engine_override(DownEngine())
    r = client.post(f"/v1/snapshots/{sid}/approve", headers=admin_headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["promoted"] is False
    assert body["snapshot"]["status"] == "failed"
    assert "connection refused" in body["snapshot"]["status_reason"]
    assert _policy(client, admin_headers, policy_name)["serving_snapshot"] == f"{policy_name}-v0"
    assert _statuses(client, admin_headers, policy_name) == {0: "serving", 1: "failed"}


def test_tampered_adapter_fails_sha256_verification_before_loading(
    client, admin_headers, policy_name, candidate, database, local_engine
):
    sid = candidate()
    with database.session() as s:
        path = Path(s.get(Snapshot, sid).adapter_path)
    with open(path / "adapter_model.safetensors", "ab") as f:
        f.write(b"\0")
    r = client.post(f"/v1/snapshots/{sid}/approve", headers=admin_headers)
    body = r.json()
    assert body["promoted"] is False and body["snapshot"]["status"] == "failed"
    assert "sha256" in body["snapshot"]["status_reason"]
    assert f"{policy_name}-v1" not in local_engine.list_models()
    assert _policy(client, admin_headers, policy_name)["serving_snapshot"] == f"{policy_name}-v0"


def test_sha256_recorded_at_training_must_match_the_manifest(
    client, admin_headers, policy_name, candidate, database
):
    sid = candidate()
    with database.session() as s:
        s.get(Snapshot, sid).adapter_sha256 = "0" * 64
    body = client.post(f"/v1/snapshots/{sid}/approve", headers=admin_headers).json()
    assert body["snapshot"]["status"] == "failed"
    assert "recorded" in body["snapshot"]["status_reason"]


def test_canary_failure_leaves_the_champion_serving(
    client, admin_headers, policy_name, candidate, local_engine
):
    sid = candidate()
    set_engine_override(CanaryFailsEngine(local_engine, f"{policy_name}-v1"))
    body = client.post(f"/v1/snapshots/{sid}/approve", headers=admin_headers).json()
    assert body["promoted"] is False
    assert body["snapshot"]["status_reason"].startswith("canary:")
    assert _policy(client, admin_headers, policy_name)["serving_snapshot"] == f"{policy_name}-v0"


def test_adapter_missing_from_the_model_list_fails_promotion(
    client, admin_headers, policy_name, candidate, local_engine
):
    sid = candidate()
    set_engine_override(ForgetfulEngine(local_engine))
    body = client.post(f"/v1/snapshots/{sid}/approve", headers=admin_headers).json()
    assert body["snapshot"]["status"] == "failed"
    assert body["snapshot"]["status_reason"].startswith("confirm:")


def test_rollback_restores_the_previous_snapshot_and_never_resurrects_the_rolled_back_one(
    client, admin_headers, policy_name, candidate
):
    sid = candidate()
    client.post(f"/v1/snapshots/{sid}/approve", headers=admin_headers)
    r = client.post(f"/v1/policies/{policy_name}/rollback", json={"reason": "bad answers"},
                    headers=admin_headers)
    assert r.status_code == 200, r.text
    assert r.json()["snapshot"]["version"] == 0
    assert _policy(client, admin_headers, policy_name)["serving_snapshot"] == f"{policy_name}-v0"
    assert _statuses(client, admin_headers, policy_name) == {0: "serving", 1: "rolled_back"}
    # A second press does not toggle back to the model that was just taken down.
    again = client.post(f"/v1/policies/{policy_name}/rollback", headers=admin_headers)
    assert again.status_code == 409, again.text
    assert "no previously serving snapshot" in again.json()["detail"]
    assert _policy(client, admin_headers, policy_name)["serving_snapshot"] == f"{policy_name}-v0"
    assert _statuses(client, admin_headers, policy_name) == {0: "serving", 1: "rolled_back"}


def test_rollback_twice_steps_back_through_what_served(
    client, admin_headers, policy_name, candidate
):
    for _ in range(2):
        sid = candidate()
        assert client.post(f"/v1/snapshots/{sid}/approve",
                           headers=admin_headers).json()["snapshot"]["status"] == "serving"
    versions = [client.post(f"/v1/policies/{policy_name}/rollback",
                            headers=admin_headers).json()["snapshot"]["version"]
                for _ in range(2)]
    assert versions == [1, 0]
    assert _statuses(client, admin_headers, policy_name) == {0: "serving", 1: "rolled_back",
                                                             2: "rolled_back"}


def test_rollback_with_no_previous_snapshot_is_409(client, admin_headers, policy_name):
    r = client.post(f"/v1/policies/{policy_name}/rollback", headers=admin_headers)
    assert r.status_code == 409
    assert r.headers["content-type"].startswith("application/problem+json")


def test_rollback_while_the_engine_is_down_changes_nothing(
    client, admin_headers, policy_name, candidate, database
):
    sid = candidate()
    client.post(f"/v1/snapshots/{sid}/approve", headers=admin_headers)
    # The previous snapshot must be loadable again; make the engine refuse everything.
    set_engine_override(DownEngine())
    # v0 has no adapter, so only the canary touches the engine — and it is down.
    r = client.post(f"/v1/policies/{policy_name}/rollback", headers=admin_headers)
    assert r.status_code == 503, r.text
    assert _statuses(client, admin_headers, policy_name) == {0: "retired", 1: "serving"}
    with database.session() as s:
        failed = s.scalars(select(AuditEvent).where(
            AuditEvent.action == "policy.rollback_failed")).all()
        assert any("connection refused" in (e.reason or "") for e in failed)


def test_rollback_needs_the_admin_scope(client, make_key, tenant, policy_name):
    r = client.post(f"/v1/policies/{policy_name}/rollback",
                    headers=bearer(make_key(tenant, "read,ingest")))
    assert r.status_code == 403


def test_statuses_in_the_database_match_the_api(client, admin_headers, candidate, database):
    sid = candidate()
    client.post(f"/v1/snapshots/{sid}/approve", headers=admin_headers)
    with database.session() as s:
        assert s.get(Snapshot, sid).status is SnapshotStatus.serving
