"""Celery tasks: thin. Each one takes ids, runs a service under a job lease, and returns.

``acks_late`` is set only where a re-delivered message is harmless *and* cheap to re-check:
rollout/grade/eval (idempotent per key) and the maintenance ticks. ``train`` and ``promote`` ack
on receipt: a lost worker is recovered by the reaper from the job row, not by redelivery, so a
long training step is never started twice by the broker.
"""

from __future__ import annotations

from typing import Any

from workers.celery_app import app
from workers.jobs.service import JobContext, RunOutcome, reap, run_job


@app.task(name="tracelearn.rollout", acks_late=True)
def rollout(job_id: int) -> RunOutcome:
    from workers.rollouts.service import handle_rollout_job

    return run_job(job_id, handle_rollout_job)


@app.task(name="tracelearn.grade", acks_late=True)
def grade(job_id: int) -> RunOutcome:
    from workers.rollouts.service import handle_grade_job

    return run_job(job_id, handle_grade_job)


@app.task(name="tracelearn.train", acks_late=False)
def train(job_id: int) -> RunOutcome:
    from workers.training.service import handle_train_job

    return run_job(job_id, handle_train_job)


def _evaluate(ctx: JobContext) -> dict[str, Any]:
    from app.db import session_scope
    from app.settings import get_settings
    from workers.evaluation.evaluate import evaluate_snapshot

    with session_scope() as session:
        row = evaluate_snapshot(session, int(ctx.payload["snapshot_id"]), get_settings())
        ctx.check()
        return {"evaluation_id": row.id, "gate_passed": row.gate_passed}


@app.task(name="tracelearn.evaluate", acks_late=True)
def evaluate(job_id: int) -> RunOutcome:
    return run_job(job_id, _evaluate)


def _promote(ctx: JobContext) -> dict[str, Any]:
    # Promotion (issue 6) registers its handler here; the payload names the snapshot.
    from workers.promotion.jobs import handle_promote_job  # type: ignore[import-not-found]

    result: dict[str, Any] = handle_promote_job(ctx)
    return result


@app.task(name="tracelearn.promote", acks_late=False)
def promote(job_id: int) -> RunOutcome:
    return run_job(job_id, _promote)


@app.task(name="tracelearn.policy_tick", acks_late=True)
def policy_tick(policy_id: int) -> dict[str, Any]:
    from workers.schedules import tick_policy

    return tick_policy(policy_id).as_dict()


@app.task(name="tracelearn.reap", acks_late=True)
def reap_expired() -> dict[str, Any]:
    from app.db import session_scope
    from workers.training.service import fail_orphaned_runs

    result = reap()
    with session_scope() as session:
        orphans = fail_orphaned_runs(session)
    return {"requeued": result.requeued, "failed": result.failed,
            "redispatched": result.redispatched, "orphaned_runs": orphans}
