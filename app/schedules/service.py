"""A policy's periodic work: what one scheduler tick does, and the maintenance sweep.

A tick (sent by beat on the policy's crontab, or ``tracelearn tick`` from cron):

1. regenerate: enqueue rollout jobs for pending traces (their grade jobs follow automatically);
2. train, when the data trigger holds: at least ``training_config['min_groups']`` graded,
   non-zero-variance groups from the serving snapshot that no succeeded run has used;
3. evaluate every candidate snapshot that has no evaluation yet.

The maintenance sweep re-queues jobs whose lease expired and fails runs whose job is gone.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import exists, select

from app.db import session_scope
from app.errors import Conflict, DomainError
from app.jobs.service import enqueue, reap, replans_exhausted
from app.models import Evaluation, JobKind, Policy, Snapshot, SnapshotStatus
from app.observability import ops
from app.rollouts.service import plan_regeneration
from app.runs.training import active_run, count_trainable_groups, fail_orphaned_runs, start_run
from app.snapshots.evaluation import eval_job_key
from app.snapshots.state import supersede_stale_candidates, transition

log = logging.getLogger(__name__)

DEFAULT_MIN_GROUPS = 16


def scheduled_policies() -> list[tuple[int, str, str]]:
    """(id, name, crontab) of every policy that has a schedule."""
    with session_scope() as session:
        rows = session.execute(
            select(Policy.id, Policy.name, Policy.schedule).where(Policy.schedule.is_not(None))
        ).all()
    return [(int(pid), str(name), str(expr)) for pid, name, expr in rows]


@dataclass
class TickResult:
    policy: str | None = None
    rollout_jobs: list[int] = field(default_factory=list)
    trainable_groups: int = 0
    min_groups: int = DEFAULT_MIN_GROUPS
    training_run_id: int | None = None
    training_skipped: str | None = None
    eval_jobs: list[int] = field(default_factory=list)
    superseded: list[int] = field(default_factory=list)
    failed_candidates: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def tick_policy(policy_id: int) -> TickResult:
    """One policy's periodic work (see the module docstring); idempotent, safe to run twice."""
    out = TickResult()
    with session_scope() as session:
        policy = session.get(Policy, policy_id)
        if policy is None:
            return out
        out.policy = policy.name
        try:
            out.rollout_jobs = [j.id for j in plan_regeneration(session, policy)]
        except DomainError as exc:
            log.warning("policy %s: regeneration not planned: %s", policy.name, exc)
        out.min_groups = int((policy.training_config or {}).get("min_groups", DEFAULT_MIN_GROUPS))
        out.trainable_groups = count_trainable_groups(session, policy)
        if out.trainable_groups < out.min_groups:
            out.training_skipped = f"{out.trainable_groups} < min_groups {out.min_groups}"
        elif active_run(session, policy.id) is not None:
            out.training_skipped = "a run is in progress"
        else:
            try:
                with session.begin_nested():
                    run = start_run(session, policy, trigger="schedule", actor="system:schedule")
                out.training_run_id = run.id
            except (Conflict, DomainError) as exc:
                out.training_skipped = exc.detail
        out.superseded = supersede_stale_candidates(session, policy, actor="system:schedule")
        unevaluated = list(session.scalars(
            select(Snapshot).where(
                Snapshot.policy_id == policy.id,
                Snapshot.status == SnapshotStatus.candidate,
                ~exists().where(Evaluation.snapshot_id == Snapshot.id),
            )
        ))
        for snapshot in unevaluated:
            job = enqueue(session, JobKind.eval, eval_job_key(snapshot.id),
                          {"snapshot_id": snapshot.id})
            if replans_exhausted(job):
                # Every re-plan failed too: the candidate gets a verdict, not a limbo.
                transition(session, snapshot, SnapshotStatus.failed, actor="system:schedule",
                           tenant=policy.tenant,
                           reason=f"evaluation failed {job.replans + 1} times: {job.error}")
                out.failed_candidates.append(snapshot.id)
            else:
                out.eval_jobs.append(job.id)
    ops.info("tick", **out.as_dict())
    return out


@dataclass
class MaintenanceResult:
    requeued: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    redispatched: int = 0
    orphaned_runs: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def maintenance() -> MaintenanceResult:
    """Re-queue jobs whose lease expired, re-send undispatched ones, fail orphaned runs."""
    reaped = reap()
    with session_scope() as session:
        orphans = fail_orphaned_runs(session)
    return MaintenanceResult(reaped.requeued, reaped.failed, reaped.redispatched, orphans)
