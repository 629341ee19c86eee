from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from app.models import Split
from app.traces.service import assign_split


def trace(ext: str, policy: str, content: str = "Patient note", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "external_id": ext,
        "policy": policy,
        "messages": [{"role": "user", "content": content}],
        "response": "Reasoning... ANSWER: YES",
    }
    body.update(extra)
    return body


def test_single_trace_is_created_then_reported_duplicate(
    client: TestClient, admin_headers, policy_name
):
    first = client.post("/v1/traces", json=trace("t1", policy_name), headers=admin_headers)
    assert first.status_code == 201, first.text
    again = client.post("/v1/traces", json=trace("t1", policy_name), headers=admin_headers)
    assert again.status_code == 200
    assert again.json()["status"] == "duplicate"
    assert again.json()["id"] == first.json()["id"]
    listed = client.get("/v1/traces", params={"policy": policy_name}, headers=admin_headers)
    assert [t["external_id"] for t in listed.json()["items"]] == ["t1"]


def test_same_external_id_with_other_content_is_409(client, admin_headers, policy_name):
    client.post("/v1/traces", json=trace("t1", policy_name), headers=admin_headers)
    r = client.post("/v1/traces", json=trace("t1", policy_name, "other"), headers=admin_headers)
    assert r.status_code == 409
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["type"].endswith("/conflict")


def test_mixed_batch_commits_valid_items_and_reports_the_rest(client, admin_headers, policy_name):
    client.post("/v1/traces", json=trace("dup", policy_name), headers=admin_headers)
    batch = {
        "traces": [
            trace("new-1", policy_name),
            trace("dup", policy_name),
            trace("dup", policy_name, "changed"),
            trace("x", "no-such-policy"),
            {"external_id": "bad", "policy": policy_name},
            trace("new-2", policy_name),
            trace("new-2", policy_name),
        ]
    }
    r = client.post("/v1/traces", json=batch, headers=admin_headers)
    assert r.status_code == 207
    statuses = [item["status"] for item in r.json()["results"]]
    assert statuses == [
        "created",
        "duplicate",
        "conflict",
        "invalid",
        "invalid",
        "created",
        "duplicate",
    ]
    results = r.json()["results"]
    assert results[6]["id"] == results[5]["id"]
    assert results[3]["error"]["detail"] == "unknown policy 'no-such-policy'"
    assert r.json()["counts"] == {"created": 2, "duplicate": 2, "conflict": 1, "invalid": 2}
    stored = client.get("/v1/traces", params={"policy": policy_name}, headers=admin_headers)
    assert sorted(t["external_id"] for t in stored.json()["items"]) == ["dup", "new-1", "new-2"]


def test_batch_over_item_limit_is_413_and_writes_nothing(
    client, admin_headers, policy_name, settings
):
    n = settings.max_batch_items + 1
    batch = {"traces": [trace(f"b{i}", policy_name) for i in range(n)]}
    r = client.post("/v1/traces", json=batch, headers=admin_headers)
    assert r.status_code == 413
    listed = client.get("/v1/traces", params={"policy": policy_name}, headers=admin_headers)
    assert listed.json()["items"] == []


def test_body_over_byte_limit_is_413(client, admin_headers, policy_name, settings):
    big = "x" * (settings.max_body_bytes + 10)
    r = client.post("/v1/traces", json=trace("big", policy_name, big), headers=admin_headers)
    assert r.status_code == 413
    assert r.json()["type"].endswith("/payload-too-large")


def test_empty_batch_is_422(client, admin_headers):
    r = client.post("/v1/traces", json={"traces": []}, headers=admin_headers)
    assert r.status_code == 422


def test_inline_outcome_is_stored_with_the_trace(client, admin_headers, policy_name):
    body = trace("o1", policy_name, outcome={"name": "pfs_gt_180d", "value": True})
    tid = client.post("/v1/traces", json=body, headers=admin_headers).json()["id"]
    got = client.get(f"/v1/traces/{tid}", headers=admin_headers).json()
    assert [(o["name"], o["value"]) for o in got["outcomes"]] == [("pfs_gt_180d", True)]


def test_late_feedback_is_joined_when_the_trace_arrives(client, admin_headers, policy_name):
    fb = {"outcomes": [{"trace_external_id": "late", "name": "pfs_gt_180d", "value": False}]}
    r = client.post("/v1/feedback", json=fb, headers=admin_headers)
    assert r.status_code == 207
    assert r.json()["results"][0]["status"] == "pending_trace"
    tid = client.post("/v1/traces", json=trace("late", policy_name), headers=admin_headers).json()[
        "id"
    ]
    got = client.get(f"/v1/traces/{tid}", headers=admin_headers).json()
    assert [(o["name"], o["value"]) for o in got["outcomes"]] == [("pfs_gt_180d", False)]
    has = client.get(
        "/v1/traces", params={"policy": policy_name, "has_outcome": True}, headers=admin_headers
    ).json()["items"]
    assert [t["id"] for t in has] == [tid]


def test_feedback_by_id_updates_the_value_and_unknown_id_is_404_item(
    client, admin_headers, policy_name
):
    tid = client.post("/v1/traces", json=trace("f1", policy_name), headers=admin_headers).json()[
        "id"
    ]
    fb = {
        "outcomes": [
            {"trace_id": tid, "name": "score", "value": 0.25, "source": "annotation"},
            {"trace_id": tid, "name": "score", "value": 0.75, "source": "annotation"},
            {"trace_id": 999999999, "name": "score", "value": 1},
            {"trace_id": tid, "trace_external_id": "f1", "name": "score", "value": 1},
        ]
    }
    r = client.post("/v1/feedback", json=fb, headers=admin_headers).json()
    assert [x["status"] for x in r["results"]] == ["stored", "stored", "not_found", "invalid"]
    got = client.get(f"/v1/traces/{tid}", headers=admin_headers).json()
    assert [(o["name"], o["value"], o["source"]) for o in got["outcomes"]] == [
        ("score", 0.75, "annotation")
    ]


def test_pii_is_redacted_before_storage(client, admin_headers, policy_name):
    note = (
        "68-year-old woman, DOB: 03/14/1957, MRN: 00482913. Contact daughter at "
        "jane.doe@example.org or (617) 555-0142. SSN 123-45-6789 on file. ECOG 1."
    )
    tid = client.post(
        "/v1/traces", json=trace("pii", policy_name, note), headers=admin_headers
    ).json()["id"]
    got = client.get(f"/v1/traces/{tid}", headers=admin_headers).json()
    stored = got["messages"][0]["content"]
    for secret in ("03/14/1957", "00482913", "jane.doe@example.org", "555-0142", "123-45-6789"):
        assert secret not in stored
    assert "ECOG 1" in stored and "68-year-old woman" in stored
    assert got["redactions"] == {"DOB": 1, "MRN": 1, "EMAIL": 1, "PHONE": 1, "SSN": 1}


def test_redaction_can_be_turned_off_per_policy(client, admin_headers, policy_name):
    r = client.patch(
        f"/v1/policies/{policy_name}", json={"redaction_enabled": False}, headers=admin_headers
    )
    assert r.status_code == 200 and r.json()["redaction_enabled"] is False
    tid = client.post(
        "/v1/traces", json=trace("raw", policy_name, "mail a@b.io"), headers=admin_headers
    ).json()["id"]
    got = client.get(f"/v1/traces/{tid}", headers=admin_headers).json()
    assert got["messages"][0]["content"] == "mail a@b.io"


def test_cursor_pagination_walks_every_trace_once(client, admin_headers, policy_name):
    batch = {"traces": [trace(f"p{i:02d}", policy_name) for i in range(23)]}
    client.post("/v1/traces", json=batch, headers=admin_headers)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"policy": policy_name, "limit": 10}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/traces", params=params, headers=admin_headers).json()
        seen += [t["external_id"] for t in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == [f"p{i:02d}" for i in range(23)]


def test_garbage_cursor_is_422(client, admin_headers):
    r = client.get("/v1/traces", params={"cursor": "not-a-cursor"}, headers=admin_headers)
    assert r.status_code == 422


def test_split_filter_matches_the_stable_hash(client, admin_headers, policy_name, tenant, settings):
    def split(external_id: str) -> Split:
        return assign_split(tenant, external_id, settings.heldout_fraction)

    # 40 ids holding both splits: a random tenant's first 40 can all hash into train (~1.5%).
    ids = [f"s{i}" for i in range(40)]
    spare = 40
    while len({split(x) for x in ids}) < 2:
        ids[-1], spare = f"s{spare}", spare + 1
    client.post("/v1/traces", json={"traces": [trace(x, policy_name) for x in ids]},
                headers=admin_headers)
    held = client.get(
        "/v1/traces",
        params={"policy": policy_name, "split": "heldout", "limit": 100},
        headers=admin_headers,
    ).json()["items"]
    expected = {x for x in ids if split(x) is Split.heldout}
    assert {t["external_id"] for t in held} == expected
    assert 0 < len(expected) < 40


def test_delete_removes_the_trace_and_records_an_audit_event(
    client, admin_headers, policy_name, database
):
    from sqlalchemy import select

    from app.models import AuditEvent

    tid = client.post("/v1/traces", json=trace("d1", policy_name), headers=admin_headers).json()[
        "id"
    ]
    r = client.delete(
        f"/v1/traces/{tid}", params={"reason": "customer request"}, headers=admin_headers
    )
    assert r.status_code == 200
    assert r.json()["deleted"] is True
    assert client.get(f"/v1/traces/{tid}", headers=admin_headers).status_code == 404
    with database.session() as s:
        events = s.scalars(
            select(AuditEvent).where(
                AuditEvent.action == "trace.delete", AuditEvent.entity_id == str(tid)
            )
        ).all()
        assert len(events) == 1 and events[0].reason == "customer request"


def test_other_tenant_cannot_read_or_delete(client, admin_headers, policy_name, make_key):
    from tests.conftest import bearer

    tid = client.post("/v1/traces", json=trace("iso", policy_name), headers=admin_headers).json()[
        "id"
    ]
    other = bearer(make_key("someone-else", "ingest,read,admin"))
    assert client.get(f"/v1/traces/{tid}", headers=other).status_code == 404
    assert client.delete(f"/v1/traces/{tid}", headers=other).status_code == 404
    assert client.get("/v1/traces", headers=other).json()["items"] == []
    r = client.post("/v1/traces", json=trace("x", policy_name), headers=other)
    assert r.status_code == 422  # the policy belongs to another tenant


def test_metrics_count_ingest_results(client, admin_headers, policy_name):
    client.post("/v1/traces", json=trace("m1", policy_name), headers=admin_headers)
    text = client.get("/metrics").text
    assert 'tracelearn_ingest_traces_total{result="created"}' in text
    assert "tracelearn_http_request_duration_seconds_bucket" in text
    # Filed under the template it was served from, its router's prefix included.
    assert 'method="POST",route="/v1/traces",status="201"' in text


def test_timestamps_are_rfc3339_utc_with_z_whichever_database_stored_them(
    client, admin_headers, policy_name
):
    from workers.clinical import task

    item = task.ingest_items(7, 1, "train", policy=policy_name)[0]
    created = client.post("/v1/traces", json=item, headers=admin_headers)
    assert created.status_code == 201, created.text
    trace = client.get(f"/v1/traces/{created.json()['id']}", headers=admin_headers).json()
    policy = client.get(f"/v1/policies/{policy_name}", headers=admin_headers).json()
    for stamp in (trace["created_at"], policy["created_at"]):
        assert stamp.endswith("Z"), stamp
