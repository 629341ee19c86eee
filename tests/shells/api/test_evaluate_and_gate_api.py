"""POST /v1/snapshots/{id}/evaluate: queued on the eval queue (202; the tests' broker is eager, so
the job has run by the time the answer arrives), a real eval on held-out traces, stored, gated."""

from __future__ import annotations

from app.models import SnapshotStatus
from workers.clinical import task

LENIENT = {"min_eval_n": 1, "require_significant_gain": False, "min_parse_rate": 0.0,
           "min_abs_gain": -1.0, "min_rel_gain": -10.0, "max_secondary_regression": 5.0}


def _ingest_until_heldout(client, headers, policy):
    """A few held-out traces, fewer than the default min_eval_n (20). The split is a stable hash
    of (tenant, external_id) and the tenant is random, so a single small batch can, now and
    then, hold no held-out trace at all: add batches until one does."""
    heldout = 0
    for seed in range(3, 23):
        items = task.ingest_items(seed, 12, "train", policy=policy)
        r = client.post("/v1/traces", json={"traces": items}, headers=headers)
        assert r.status_code == 207, r.text
        heldout += sum(res["split"] == "heldout" for res in r.json()["results"])
        if heldout:
            return heldout
    raise AssertionError("240 traces and not one held out")


def _request_evaluation(client, headers, sid):
    return client.post(f"/v1/snapshots/{sid}/evaluate",
                       json={"k": 2, "max_tokens": 16, "breakdown_key": "case.biomarker"},
                       headers=headers)


def _evaluate(client, headers, sid):
    """Queue the evaluation, then read the stored result."""
    r = _request_evaluation(client, headers, sid)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["snapshot_id"] == sid and job["status"] == "queued"
    stored = client.get(job["evaluations_url"], headers=headers).json()
    assert stored, f"the eval job stored nothing: {job}"
    return stored[0]


def test_candidate_below_min_eval_n_is_rejected_with_the_reason(
    client, admin_headers, policy_name, candidate
):
    assert 0 < _ingest_until_heldout(client, admin_headers, policy_name) < 20
    sid = candidate(SnapshotStatus.candidate)
    ev = _evaluate(client, admin_headers, sid)
    assert ev["gate_passed"] is False
    assert any("eval n" in reason for reason in ev["gate_reasons"])
    snap = client.get(f"/v1/snapshots/{sid}", headers=admin_headers).json()
    assert snap["status"] == "rejected" and "eval n" in snap["status_reason"]


def test_passing_candidate_awaits_approval_with_stored_metrics(
    client, admin_headers, policy_name, candidate
):
    _ingest_until_heldout(client, admin_headers, policy_name)
    r = client.patch(f"/v1/policies/{policy_name}", json={"gate": LENIENT},
                     headers=admin_headers)
    assert r.status_code == 200, r.text
    sid = candidate(SnapshotStatus.candidate)
    ev = _evaluate(client, admin_headers, sid)
    assert ev["gate_passed"] is True, ev["gate_reasons"]
    assert ev["n"] >= 1 and ev["dataset"] == "heldout"
    for name in ("correct", "parse_rate", "mean_reward", "pass@1"):
        m = ev["metrics"][name]
        assert m["ci_low"] <= m["value"] <= m["ci_high"]
        assert name in ev["comparison"]["champion"]
    assert "p_value" in ev["comparison"]["mcnemar"]
    assert ev["breakdown"]["key"] == "case.biomarker"
    snap = client.get(f"/v1/snapshots/{sid}", headers=admin_headers).json()
    assert snap["status"] == "awaiting_approval"
    stored = client.get(f"/v1/snapshots/{sid}/evaluations", headers=admin_headers).json()
    assert [e["id"] for e in stored] == [ev["id"]]
    actions = [e["action"] for e in client.get(
        "/v1/audit-events", params={"entity_id": str(sid), "entity_type": "snapshot"},
        headers=admin_headers).json()["items"]]
    assert actions == ["snapshot.awaiting_approval", "snapshot.evaluated"]


def test_evaluating_without_held_out_traces_is_a_clear_4xx(
    client, admin_headers, candidate
):
    sid = candidate(SnapshotStatus.candidate)
    r = _request_evaluation(client, admin_headers, sid)
    assert r.status_code == 409, r.text
    assert "held-out" in r.json()["detail"]
