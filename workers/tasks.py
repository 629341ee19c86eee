"""Celery tasks: thin. Each maps a job kind to one domain service run under the job's lease.

``acks_late`` is set only where a re-delivered message is harmless *and* cheap to re-check:
rollout/grade/eval (idempotent per key) and the maintenance ticks. ``train`` and ``promote`` ack
on receipt: a lost worker is recovered by the reaper from the job row, not by redelivery, so a
long training step is never started twice by the broker.
"""

from __future__ import annotations

from typing import Any

from app.jobs.service import RunOutcome, run_job
from app.retention import retention_pass
from app.rollouts.service import handle_grade_job, handle_rollout_job
from app.runs.training import handle_train_job
from app.schedules.service import maintenance, tick_policy
from app.settings import get_settings
from app.snapshots.evaluation import handle_eval_job
from app.snapshots.promotion import handle_promote_job
from workers.celery_app import app as celery


@celery.task(name="tracelearn.rollout", acks_late=True)
def rollout(job_id: int) -> RunOutcome:
    return run_job(job_id, handle_rollout_job)


@celery.task(name="tracelearn.grade", acks_late=True)
def grade(job_id: int) -> RunOutcome:
    return run_job(job_id, handle_grade_job)


@celery.task(name="tracelearn.train", acks_late=False)
def train(job_id: int) -> RunOutcome:
    return run_job(job_id, handle_train_job)


@celery.task(name="tracelearn.evaluate", acks_late=True)
def evaluate(job_id: int) -> RunOutcome:
    return run_job(job_id, handle_eval_job)


@celery.task(name="tracelearn.promote", acks_late=False)
def promote(job_id: int) -> RunOutcome:
    return run_job(job_id, handle_promote_job)


@celery.task(name="tracelearn.policy_tick", acks_late=True)
def policy_tick(policy_id: int) -> dict[str, Any]:
    return tick_policy(policy_id).as_dict()


@celery.task(name="tracelearn.reap", acks_late=True)
def reap_expired() -> dict[str, Any]:
    return maintenance().as_dict()


@celery.task(name="tracelearn.retention", acks_late=True)
def retention() -> dict[str, Any]:
    return retention_pass(get_settings()).as_dict()
