"""Outcome precedence over HTTP, on Postgres and SQLite: feedback outranks the inline outcome,
within one origin the later label wins, a retried trace never changes a stored outcome, and
every change is in the audit log."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db import Database
from app.models import AuditEvent

H = dict[str, str]


def trace(ext: str, policy: str, outcome: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"external_id": ext, "policy": policy,
                            "messages": [{"role": "user", "content": "Patient note"}],
                            "response": "ANSWER: YES"}
    if outcome is not None:
        body["outcome"] = {"name": "correct", "value": outcome}
    return body


def post_trace(client: TestClient, headers: H, body: dict[str, Any], status: int) -> int:
    r = client.post("/v1/traces", json=body, headers=headers)
    assert r.status_code == status, r.text
    return int(r.json()["id"])


def feedback(client: TestClient, headers: H, ext: str, value: Any, **extra: Any) -> str:
    item = {"trace_external_id": ext, "name": "correct", "value": value, **extra}
    r = client.post("/v1/feedback", json={"outcomes": [item]}, headers=headers)
    assert r.status_code == 207, r.text
    return str(r.json()["results"][0]["status"])


def outcomes(client: TestClient, headers: H, trace_id: int) -> list[tuple[Any, str, str]]:
    got = client.get(f"/v1/traces/{trace_id}", headers=headers).json()["outcomes"]
    return [(o["value"], o["source"], o["origin"]) for o in got]


def audit(database: Database, tenant: str) -> list[tuple[Any, Any]]:
    with database.session() as s:
        rows = s.scalars(select(AuditEvent).where(AuditEvent.tenant == tenant,
                                                  AuditEvent.action == "outcome.set")
                         .order_by(AuditEvent.id))
        return [(r.before.get("value"), r.after.get("value")) for r in rows]


def test_a_retry_does_not_undo_a_human_label(
    client: TestClient, admin_headers: H, policy_name: str, database: Database, tenant: str
) -> None:
    # The reported defect: inline false, annotation true, identical retry → back to false/api.
    tid = post_trace(client, admin_headers, trace("t", policy_name, False), 201)
    assert feedback(client, admin_headers, "t", True, source="annotation") == "stored"
    assert post_trace(client, admin_headers, trace("t", policy_name, False), 200) == tid
    assert outcomes(client, admin_headers, tid) == [(True, "annotation", "feedback")]
    assert audit(database, tenant) == [(None, False), (False, True)]


def test_a_retry_with_another_inline_value_changes_nothing(
    client: TestClient, admin_headers: H, policy_name: str, database: Database, tenant: str
) -> None:
    tid = post_trace(client, admin_headers, trace("t", policy_name, False), 201)
    post_trace(client, admin_headers, trace("t", policy_name, True), 200)
    assert outcomes(client, admin_headers, tid) == [(False, "api", "inline")]
    assert audit(database, tenant) == [(None, False)]


def test_a_retry_cannot_add_an_outcome_the_first_send_lacked(
    client: TestClient, admin_headers: H, policy_name: str
) -> None:
    tid = post_trace(client, admin_headers, trace("t", policy_name), 201)
    post_trace(client, admin_headers, trace("t", policy_name, True), 200)
    assert outcomes(client, admin_headers, tid) == []


def test_feedback_after_a_retry_outranks_the_inline_outcome(
    client: TestClient, admin_headers: H, policy_name: str
) -> None:
    tid = post_trace(client, admin_headers, trace("t", policy_name, False), 201)
    post_trace(client, admin_headers, trace("t", policy_name, False), 200)
    assert feedback(client, admin_headers, "t", True) == "stored"
    assert outcomes(client, admin_headers, tid) == [(True, "api", "feedback")]


def test_feedback_before_the_trace_outranks_its_late_inline_outcome(
    client: TestClient, admin_headers: H, policy_name: str, database: Database, tenant: str
) -> None:
    assert feedback(client, admin_headers, "late", True, source="annotation") == "pending_trace"
    tid = post_trace(client, admin_headers, trace("late", policy_name, False), 201)
    assert outcomes(client, admin_headers, tid) == [(True, "annotation", "feedback")]
    post_trace(client, admin_headers, trace("late", policy_name, False), 200)
    assert outcomes(client, admin_headers, tid) == [(True, "annotation", "feedback")]
    assert audit(database, tenant) == [(None, True)]


def test_feedback_before_the_trace_is_joined_when_it_arrives_without_an_outcome(
    client: TestClient, admin_headers: H, policy_name: str
) -> None:
    assert feedback(client, admin_headers, "late", 0.5) == "pending_trace"
    tid = post_trace(client, admin_headers, trace("late", policy_name), 201)
    assert outcomes(client, admin_headers, tid) == [(0.5, "api", "feedback")]


def test_of_two_feedback_labels_the_later_wins_whatever_the_arrival_order(
    client: TestClient, admin_headers: H, policy_name: str, database: Database, tenant: str
) -> None:
    tid = post_trace(client, admin_headers, trace("t", policy_name), 201)
    assert feedback(client, admin_headers, "t", "late",
                    labelled_at="2026-01-02T00:00:00Z") == "stored"
    assert feedback(client, admin_headers, "t", "early",
                    labelled_at="2026-01-01T00:00:00Z") == "outranked"
    assert outcomes(client, admin_headers, tid) == [("late", "api", "feedback")]
    assert feedback(client, admin_headers, "t", "later",
                    labelled_at="2026-01-03T00:00:00+01:00") == "stored"
    assert outcomes(client, admin_headers, tid) == [("later", "api", "feedback")]
    assert audit(database, tenant) == [(None, "late"), ("late", "later")]


def test_feedback_without_a_time_is_labelled_on_arrival_so_the_last_sent_wins(
    client: TestClient, admin_headers: H, policy_name: str
) -> None:
    tid = post_trace(client, admin_headers, trace("t", policy_name), 201)
    assert feedback(client, admin_headers, "t", 1) == "stored"
    assert feedback(client, admin_headers, "t", 2, source="annotation") == "stored"
    assert feedback(client, admin_headers, "t", 3, source="eval") == "stored"
    assert outcomes(client, admin_headers, tid) == [(3, "eval", "feedback")]


def test_within_one_feedback_batch_the_last_equal_label_wins(
    client: TestClient, admin_headers: H, policy_name: str, database: Database, tenant: str
) -> None:
    tid = post_trace(client, admin_headers, trace("t", policy_name, False), 201)
    # true and 1 are different labels (== would call them equal).
    items = [{"trace_id": tid, "name": "correct", "value": v} for v in (0.5, True, 1)]
    r = client.post("/v1/feedback", json={"outcomes": items}, headers=admin_headers)
    assert [x["status"] for x in r.json()["results"]] == ["stored"] * 3
    got = outcomes(client, admin_headers, tid)
    assert got == [(1, "api", "feedback")] and got[0][0] is not True
    # One change per request: stored → the batch's final label.
    assert audit(database, tenant) == [(None, False), (False, 1)]


def test_a_future_label_time_counts_as_now(
    client: TestClient, admin_headers: H, policy_name: str
) -> None:
    tid = post_trace(client, admin_headers, trace("t", policy_name), 201)
    assert feedback(client, admin_headers, "t", "future",
                    labelled_at="2999-01-01T00:00:00Z") == "stored"
    assert feedback(client, admin_headers, "t", "now") == "stored"
    assert outcomes(client, admin_headers, tid) == [("now", "api", "feedback")]


def test_restating_the_stored_label_is_not_an_audited_change(
    client: TestClient, admin_headers: H, policy_name: str, database: Database, tenant: str
) -> None:
    post_trace(client, admin_headers, trace("t", policy_name), 201)
    for _ in range(3):
        assert feedback(client, admin_headers, "t", True) == "stored"
    assert audit(database, tenant) == [(None, True)]


def test_outcome_changes_are_audited_with_who_when_and_both_labels(
    client: TestClient, admin_headers: H, policy_name: str, database: Database, tenant: str
) -> None:
    post_trace(client, admin_headers, trace("t", policy_name, False), 201)
    feedback(client, admin_headers, "t", True, source="annotation")
    with database.session() as s:
        events = list(s.scalars(select(AuditEvent).where(
            AuditEvent.tenant == tenant, AuditEvent.action == "outcome.set")
            .order_by(AuditEvent.id)))
        assert all(e.actor and e.created_at and e.entity_type == "outcome" for e in events)
        last = events[-1]
        assert last.before | {"labelled_at": None} == {
            "trace_external_id": "t", "name": "correct", "value": False, "source": "api",
            "origin": "inline", "labelled_at": None}
        assert last.after["value"] is True and last.after["source"] == "annotation"
        assert last.after["origin"] == "feedback" and last.after["labelled_at"]
