"""Training runs through the API: start one by hand, read status, progress, metrics and errors.

The work itself lives in ``app.runs.training``; this module only scopes it to the
caller's tenant and shapes the answers.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.auth.service import Principal
from app.errors import NotFound
from app.models import Policy, Snapshot, TrainingRun, training_run_groups
from app.policies.service import get_policy
from app.runs import training
from app.runs.schemas import RunCreate, RunOut


def start_run(session: Session, principal: Principal, policy_name: str, body: RunCreate) -> RunOut:
    policy = get_policy(session, principal.tenant, policy_name)
    overrides = dict(body.config)
    if body.algorithm is not None:
        overrides["algorithm"] = body.algorithm
    run = training.start_run(
        session, policy, trigger="manual", actor=principal.actor, overrides=overrides
    )
    session.flush()
    return to_out(session, run, policy)


def get_run(session: Session, principal: Principal, run_id: int) -> RunOut:
    row = session.execute(
        select(TrainingRun, Policy)
        .join(Policy, Policy.id == TrainingRun.policy_id)
        .where(TrainingRun.id == run_id, Policy.tenant == principal.tenant)
    ).first()
    if row is None:
        raise NotFound(f"no training run {run_id}")
    return to_out(session, row[0], row[1])


def list_runs(
    session: Session, principal: Principal, policy_name: str | None, limit: int
) -> list[RunOut]:
    query = (
        select(TrainingRun, Policy)
        .join(Policy, Policy.id == TrainingRun.policy_id)
        .where(Policy.tenant == principal.tenant)
        .order_by(TrainingRun.id.desc())
        .limit(limit)
    )
    if policy_name is not None:
        query = query.where(Policy.id == get_policy(session, principal.tenant, policy_name).id)
    return [to_out(session, run, policy) for run, policy in session.execute(query).all()]


def _served(session: Session, snapshot_id: int | None) -> str | None:
    if snapshot_id is None:
        return None
    snap = session.get(Snapshot, snapshot_id)
    return snap.served_name if snap else None


def to_out(session: Session, run: TrainingRun, policy: Policy) -> RunOut:
    job = training.train_job(session, run.id)
    summary = (run.metrics or {}).get("summary") or {}
    groups = session.scalar(
        select(func.count()).where(training_run_groups.c.training_run_id == run.id)
    )
    return RunOut(
        id=run.id,
        policy=policy.name,
        algorithm=run.algorithm,
        status=run.status.value,
        trigger=run.trigger,
        progress=run.progress,
        config=run.config,
        metrics=run.metrics,
        error=run.error,
        parent_snapshot=_served(session, run.parent_snapshot_id),
        output_snapshot=_served(session, run.output_snapshot_id),
        groups_used=int(groups or 0),
        optimizer_steps=summary.get("optimizer_steps"),
        epochs=summary.get("epochs"),
        job_status=job.status.value if job else None,
        job_attempts=job.attempts if job else None,
        created_by=run.created_by,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        heartbeat_at=run.heartbeat_at,
    )
