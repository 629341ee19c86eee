"""Where redaction applies beyond messages: outcome string values are redacted, an external_id
holding PII is refused (never rewritten), and a retry of the same raw trace stays a duplicate."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from ._helpers import assert_problem, trace_body

H = dict[str, str]
NOTE = "Reviewer: patient reachable at +44 20 7946 0958, card 4111 1111 1111 1111"


def outcome_values(client: TestClient, headers: H, trace_id: int) -> list[Any]:
    got = client.get(f"/v1/traces/{trace_id}", headers=headers).json()
    return [o["value"] for o in got["outcomes"]]


def test_inline_and_feedback_outcome_strings_are_redacted(
    client: TestClient, admin_headers: H, policy_name: str
) -> None:
    body = trace_body("o", policy_name, outcome={"name": "note", "value": NOTE[:120]})
    r = client.post("/v1/traces", json=body, headers=admin_headers)
    assert r.status_code == 201, r.text
    tid = r.json()["id"]
    assert outcome_values(client, admin_headers, tid) == [
        "Reviewer: patient reachable at [PHONE], card [CARD]"]
    fb = {"outcomes": [{"trace_id": tid, "name": "review", "value": "SSN 123 45 6789"}]}
    assert client.post("/v1/feedback", json=fb, headers=admin_headers).status_code == 207
    assert sorted(outcome_values(client, admin_headers, tid)) == sorted([
        "Reviewer: patient reachable at [PHONE], card [CARD]", "SSN [SSN]"])
    # The content hash is of the raw trace: the same raw retry is a duplicate.
    again = client.post("/v1/traces", json=body, headers=admin_headers)
    assert again.status_code == 200 and again.json()["status"] == "duplicate"


def test_an_external_id_holding_pii_is_refused_not_rewritten(
    client: TestClient, admin_headers: H, policy_name: str, tenant: str, stored_counts: Any
) -> None:
    for ext in ("user-jane.doe@example.org", "call-+44 20 7946 0958", "4111111111111111"):
        r = client.post("/v1/traces", json=trace_body(ext, policy_name), headers=admin_headers)
        assert assert_problem(r, 422)["type"].endswith("/pii-in-external-id"), ext
    assert stored_counts(tenant) == (0, 0)
    ok = client.post("/v1/traces", json=trace_body("req-8f3a2c91", policy_name),
                     headers=admin_headers)
    assert ok.status_code == 201


def test_without_redaction_external_ids_and_outcomes_are_kept_as_sent(
    client: TestClient, admin_headers: H, policy_name: str
) -> None:
    client.patch(f"/v1/policies/{policy_name}", json={"redaction_enabled": False},
                 headers=admin_headers)
    body = trace_body("user-jane.doe@example.org", policy_name,
                      outcome={"name": "note", "value": "call +44 20 7946 0958"})
    r = client.post("/v1/traces", json=body, headers=admin_headers)
    assert r.status_code == 201, r.text
    assert outcome_values(client, admin_headers, r.json()["id"]) == ["call +44 20 7946 0958"]
