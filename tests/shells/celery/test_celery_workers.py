"""Real Celery worker subprocesses on Redis and Postgres: delivery, crash recovery."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import func, select

from app.db import session_scope
from app.jobs.service import reap
from app.models import GroupStatus, Job, JobKind, JobStatus, Rollout, RolloutGroup
from app.rollouts.service import plan_regeneration
from app.settings import Settings
from tests.support.pipeline import Proc, policy_row, seed_policy, wait_until


def _group_rows(snapshot_id: int) -> list[tuple[int, int, list[int]]]:
    """(group id, trace id, sorted rollout indices) per group of the snapshot."""
    with session_scope() as s:
        groups = list(s.scalars(select(RolloutGroup).where(RolloutGroup.snapshot_id == snapshot_id)))
        return [(g.id, g.trace_id, sorted(r.index for r in g.rollouts)) for g in groups]


def _job(job_id: int) -> Job:
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def test_kill_9_mid_regeneration_then_a_new_worker_finishes_with_no_duplicates(
    pg_settings: Settings, model_dir: Path, start_worker: Callable[..., Proc]
) -> None:
    n_traces, g = 6, 4
    name, trace_ids = seed_policy(
        pg_settings, model_dir, n_traces=n_traces, group_size=g, max_tokens=64,
        training={"min_groups": 1, "traces_per_call": 1},
    )
    snapshot_id = policy_row(name).serving_snapshot_id
    assert snapshot_id is not None
    # Two workers on the queue, started together (startup dominates on a busy box); whichever
    # claims the job is killed, the other one rescues it.
    workers = [start_worker(pg_settings, "rollout,grade", name=n, wait=False) for n in "ab"]
    for w in workers:
        w.wait_for("ready.")
    with session_scope() as s:
        (job,) = plan_regeneration(s, policy_row(name))
    job_id = job.id

    # Kill while the job is running and has committed part of its work.
    t0 = time.monotonic()
    wait_until(lambda: len(_group_rows(snapshot_id)) >= 2, timeout=120, every=0.02)
    owner = _job(job_id).lease_owner or ""
    doomed = next(w for w in workers if f":{w.popen.pid}:" in owner)
    doomed.kill9()
    print(f"killed the owner after {time.monotonic() - t0:.1f}s")
    partial = _group_rows(snapshot_id)
    held = _job(job_id)
    assert held.status == JobStatus.running and held.attempts == 1
    assert 2 <= len(partial) < n_traces, "the job finished before the kill; make it longer"

    def done() -> bool:
        reap()  # the lease (5 s) expires, the reaper re-queues, the new worker claims
        return _job(job_id).status == JobStatus.succeeded

    t0 = time.monotonic()
    wait_until(done, timeout=180, every=0.5)
    print(f"rescued after {time.monotonic() - t0:.1f}s")
    final = _job(job_id)
    assert final.attempts == 2 and final.result["groups_created"] == n_traces - len(partial)

    groups = _group_rows(snapshot_id)
    assert len(groups) == n_traces and sorted(t for _, t, _ in groups) == sorted(trace_ids)
    assert all(indices == list(range(g)) for _, _, indices in groups)
    with session_scope() as s:
        total = s.scalar(select(func.count(Rollout.id)).where(
            Rollout.group_id.in_([gid for gid, _, _ in groups])))
    assert total == n_traces * g  # 0 duplicate rollouts

    # The grade job enqueued by the rescuing attempt covers its groups; the rescuer grades them.
    grade_job_id = final.result["grade_job_id"]
    wait_until(lambda: _job(grade_job_id).status == JobStatus.succeeded, timeout=120, every=0.5)
    with session_scope() as s:
        statuses = set(s.scalars(select(RolloutGroup.status).where(
            RolloutGroup.id.in_(_job(grade_job_id).payload["group_ids"]))))
    assert statuses == {GroupStatus.graded}


def test_a_duplicate_message_is_skipped_by_the_worker(
    pg_settings: Settings, model_dir: Path, start_worker: Callable[..., Proc]
) -> None:
    from workers.celery_app import get_celery

    name, _ = seed_policy(pg_settings, model_dir, n_traces=2, group_size=2)
    worker = start_worker(pg_settings, "rollout", name="dup")
    with session_scope() as s:
        (job,) = plan_regeneration(s, policy_row(name))
    wait_until(lambda: _job(job.id).status == JobStatus.succeeded, timeout=120, every=0.3)
    get_celery().send_task("tracelearn.rollout", args=[job.id], queue="rollout")
    wait_until(lambda: worker.text().count("tracelearn.rollout") >= 4, timeout=60, every=0.3)
    time.sleep(0.5)
    assert "'skipped'" in worker.text()
    assert _job(job.id).attempts == 1
    with session_scope() as s:
        assert s.scalar(select(func.count(Job.id)).where(
            Job.kind == JobKind.grade, Job.key.like(f"grade:snapshot={job.payload['snapshot_id']}:%")
        )) == 1
