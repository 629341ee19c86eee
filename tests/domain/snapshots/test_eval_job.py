"""The eval job on the job machinery: its lease heartbeat and its own writes never contend for
the database lock (issue 17: on SQLite the heartbeat used to wait 30 s on the evaluation's
uncommitted writes, time out and fail every attempt)."""

from __future__ import annotations

import time

from sqlalchemy import select

from app.jobs.service import enqueue, run_job
from app.models import Job, JobKind, JobStatus, Snapshot, SnapshotStatus
from app.snapshots.evaluation import eval_job_key, handle_eval_job
from workers.clinical import task


def _ingest_until_heldout(client, headers, policy):
    for seed in range(3, 23):
        items = task.ingest_items(seed, 12, "train", policy=policy)
        r = client.post("/v1/traces", json={"traces": items}, headers=headers)
        assert r.status_code == 207, r.text
        if any(res["split"] == "heldout" for res in r.json()["results"]):
            return
    raise AssertionError("240 traces and not one held out")


def test_eval_job_heartbeats_while_sampling_and_commits_its_verdict_without_waiting(
    client, admin_headers, policy_name, candidate, database
):
    _ingest_until_heldout(client, admin_headers, policy_name)
    sid = candidate(SnapshotStatus.candidate)
    with database.session() as s:
        job_id = enqueue(s, JobKind.eval, eval_job_key(sid),
                         {"snapshot_id": sid, "options": {"k": 2, "max_tokens": 12}},
                         dispatch=False).id
    started = time.monotonic()
    # A 1.5 s lease: the heartbeat thread writes every 0.5 s while the job samples.
    outcome = run_job(job_id, handle_eval_job, lease_s=1.5)
    assert outcome == "succeeded"
    assert time.monotonic() - started < 25  # SQLite's busy timeout is 30 s
    with database.session() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status is JobStatus.succeeded and job.attempts == 1
        snapshot = s.scalars(select(Snapshot).where(Snapshot.id == sid)).one()
        assert snapshot.status in (SnapshotStatus.rejected, SnapshotStatus.awaiting_approval)
