"""The promote job run by a worker: promotes an approved snapshot, and a redelivery is a no-op."""

from __future__ import annotations

from types import SimpleNamespace

from app.models import Policy, Snapshot, SnapshotStatus
from app.snapshots.promotion import handle_promote_job


def _ctx(snapshot_id: int) -> SimpleNamespace:
    return SimpleNamespace(payload={"snapshot_id": snapshot_id, "actor": "ops:alice"},
                           check=lambda: None)


def test_promote_job_serves_an_approved_snapshot_and_redelivery_is_a_no_op(
    candidate, database
):
    sid = candidate(SnapshotStatus.approved)
    first = handle_promote_job(_ctx(sid))  # type: ignore[arg-type]
    assert first["ok"] is True and first["status"] == "serving"
    again = handle_promote_job(_ctx(sid))  # type: ignore[arg-type]
    assert again == {"snapshot_id": sid, "status": "serving", "skipped": True}
    with database.session() as s:
        snap = s.get(Snapshot, sid)
        assert s.get(Policy, snap.policy_id).serving_snapshot_id == sid
