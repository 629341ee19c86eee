"""The snapshot state machine over HTTP: illegal transitions are 409 and change nothing, reads are
tenant-scoped, the audit log filters."""

from __future__ import annotations

import itertools

import pytest

from app.models import SNAPSHOT_TRANSITIONS, SnapshotStatus
from tests.conftest import bearer


@pytest.mark.parametrize(
    ("status", "action", "body"),
    [
        (SnapshotStatus.candidate, "approve", {}),
        (SnapshotStatus.rejected, "approve", {}),
        (SnapshotStatus.failed, "reject", {"comment": "no"}),
        (SnapshotStatus.approved, "reject", {"comment": "too late"}),
        (SnapshotStatus.awaiting_approval, "evaluate", {}),
    ],
)
def test_illegal_transition_is_409_and_changes_nothing(
    client, admin_headers, candidate, status, action, body
):
    sid = candidate(status)
    before = client.get("/v1/audit-events", headers=admin_headers).json()["items"]
    r = client.post(f"/v1/snapshots/{sid}/{action}", json=body, headers=admin_headers)
    assert r.status_code == 409, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert client.get(f"/v1/snapshots/{sid}", headers=admin_headers).json()["status"] == status
    after = client.get("/v1/audit-events", headers=admin_headers).json()["items"]
    assert len(after) == len(before)


def test_serving_snapshot_cannot_be_approved_again(client, admin_headers, policy_name):
    v0 = client.get(f"/v1/policies/{policy_name}/snapshots", headers=admin_headers).json()[0]
    r = client.post(f"/v1/snapshots/{v0['id']}/approve", headers=admin_headers)
    assert r.status_code == 409
    assert r.json()["type"].endswith("/illegal-transition")
    assert r.json()["current_status"] == "serving"


def test_reject_records_the_comment(client, admin_headers, candidate):
    sid = candidate()
    r = client.post(f"/v1/snapshots/{sid}/reject", json={"comment": "hallucinated doses"},
                    headers=admin_headers)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "rejected"
    assert r.json()["status_reason"] == "hallucinated doses"
    events = client.get("/v1/audit-events", params={"action": "snapshot.rejected"},
                        headers=admin_headers).json()["items"]
    assert events[0]["reason"] == "hallucinated doses"


def test_reject_without_a_comment_is_422(client, admin_headers, candidate):
    sid = candidate()
    assert client.post(f"/v1/snapshots/{sid}/reject", json={},
                       headers=admin_headers).status_code == 422


def test_read_scope_may_look_but_not_approve(client, make_key, tenant, candidate):
    sid = candidate()
    reader = bearer(make_key(tenant, "read"))
    assert client.get(f"/v1/snapshots/{sid}", headers=reader).status_code == 200
    assert client.post(f"/v1/snapshots/{sid}/approve", headers=reader).status_code == 403


def test_another_tenants_snapshot_is_not_found(client, make_key, candidate):
    sid = candidate()
    stranger = bearer(make_key("someone-else", "read,admin"))
    assert client.get(f"/v1/snapshots/{sid}", headers=stranger).status_code == 404
    assert client.post(f"/v1/snapshots/{sid}/approve", headers=stranger).status_code == 404


def test_audit_events_filter_by_action_prefix_and_paginate(
    client, admin_headers, candidate
):
    for _ in range(3):
        sid = candidate()
        client.post(f"/v1/snapshots/{sid}/reject", json={"comment": "x"}, headers=admin_headers)
    page = client.get("/v1/audit-events", params={"action": "snapshot.*", "limit": 2},
                      headers=admin_headers).json()
    assert len(page["items"]) == 2 and page["next_cursor"] is not None
    rest = client.get("/v1/audit-events",
                      params={"action": "snapshot.*", "cursor": page["next_cursor"]},
                      headers=admin_headers).json()
    assert all(e["action"] == "snapshot.rejected" for e in page["items"] + rest["items"])
    assert len(page["items"]) + len(rest["items"]) == 3


def test_transition_table_has_a_path_from_candidate_to_serving():
    path = [SnapshotStatus.candidate, SnapshotStatus.evaluated, SnapshotStatus.awaiting_approval,
            SnapshotStatus.approved, SnapshotStatus.deploying, SnapshotStatus.serving,
            SnapshotStatus.retired]
    for a, b in itertools.pairwise(path):
        assert b in SNAPSHOT_TRANSITIONS[a]
