"""The promote job: what the ``tracelearn.promote`` Celery task runs for an approved snapshot.

Approval through the API or dashboard promotes at once; this job is for deployments that approve
out of band (an approval recorded by another system, a retry after an engine outage) and want the
load to happen on a worker. A re-delivered job finds the work done and reports it.
"""

from __future__ import annotations

from typing import Any

from app.db import session_scope
from app.models import Snapshot, SnapshotStatus
from app.settings import get_settings
from workers.jobs.service import JobContext, PermanentJobError
from workers.promotion.engine import engine_for
from workers.promotion.promote import promote


def handle_promote_job(ctx: JobContext) -> dict[str, Any]:
    snapshot_id = int(ctx.payload["snapshot_id"])
    actor = str(ctx.payload.get("actor") or "system:promote")
    with session_scope() as session:
        snapshot = session.get(Snapshot, snapshot_id)
        if snapshot is None:
            raise PermanentJobError(f"snapshot {snapshot_id} does not exist")
        if snapshot.status is not SnapshotStatus.approved:
            # Already promoted, failed, or never approved: nothing for this job to do.
            return {"snapshot_id": snapshot_id, "status": snapshot.status.value, "skipped": True}
        ctx.check()
        engine = engine_for(get_settings(), snapshot.policy.base_model)
        result = promote(session, snapshot_id, engine, actor=actor,
                         reason=ctx.payload.get("reason"))
        return {"snapshot_id": snapshot_id, "status": result.status.value, "ok": result.ok,
                "reason": result.reason, "previous_snapshot_id": result.previous_snapshot_id}
