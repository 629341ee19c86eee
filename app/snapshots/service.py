"""Snapshots: listing, evaluation, the gate, approval, rejection, promotion and rollback.

Every status change goes through ``transition`` (the state machine in ``app.snapshots.state``,
driven by ``SNAPSHOT_TRANSITIONS``): an illegal one is a 409 and every legal one is audited.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth.service import Principal
from app.engines import engine_for
from app.errors import Conflict, InvalidInput, NotFound
from app.jobs.service import enqueue
from app.models import AuditEvent, Evaluation, JobKind, Policy, Snapshot, SnapshotStatus
from app.policies.service import get_policy
from app.settings import Settings
from app.snapshots.evaluation import (
    EvalOptions,
    EvaluationError,
    eval_job_key,
    plan_evaluation,
)
from app.snapshots.promotion import PromotionResult, promote, rollback
from app.snapshots.schemas import (
    ApproveIn,
    AuditEventOut,
    AuditPage,
    EvalJobOut,
    EvaluateIn,
    EvaluationOut,
    RejectIn,
    RollbackIn,
    SnapshotOut,
)
from app.snapshots.state import transition
from workers.inference.serving import ServingEngine

__all__ = [
    "approve",
    "evaluate",
    "get_snapshot",
    "list_audit_events",
    "list_evaluations",
    "list_snapshots",
    "reject",
    "rollback_policy",
    "transition",
]


def to_out(snapshot: Snapshot, policy: Policy | None = None) -> SnapshotOut:
    policy = policy or snapshot.policy
    return SnapshotOut(
        id=snapshot.id,
        policy=policy.name,
        version=snapshot.version,
        served_name=snapshot.served_name,
        status=snapshot.status,
        status_reason=snapshot.status_reason,
        serving=policy.serving_snapshot_id == snapshot.id,
        parent_id=snapshot.parent_id,
        adapter_path=snapshot.adapter_path,
        adapter_sha256=snapshot.adapter_sha256,
        training_run_id=snapshot.training_run_id,
        created_at=snapshot.created_at,
        updated_at=snapshot.updated_at,
    )


def evaluation_out(row: Evaluation) -> EvaluationOut:
    return EvaluationOut.model_validate(row, from_attributes=True)


def get_snapshot(session: Session, tenant: str, snapshot_id: int) -> Snapshot:
    snapshot = session.get(Snapshot, snapshot_id)
    # Another tenant's snapshot is reported as absent, never as forbidden.
    if snapshot is None or snapshot.policy.tenant != tenant:
        raise NotFound(f"no snapshot with id {snapshot_id}")
    return snapshot


def list_snapshots(session: Session, tenant: str, policy_name: str) -> list[Snapshot]:
    policy = get_policy(session, tenant, policy_name)
    return list(
        session.scalars(
            select(Snapshot).where(Snapshot.policy_id == policy.id).order_by(Snapshot.version)
        )
    )


def list_evaluations(session: Session, tenant: str, snapshot_id: int) -> list[Evaluation]:
    get_snapshot(session, tenant, snapshot_id)
    return list(
        session.scalars(
            select(Evaluation)
            .where(Evaluation.snapshot_id == snapshot_id)
            .order_by(Evaluation.id.desc())
        )
    )


def evaluate(
    session: Session, principal: Principal, snapshot_id: int, body: EvaluateIn
) -> EvalJobOut:
    """Queue the candidate's evaluation on the eval workers (the API never loads a model for
    it); a failed evaluation is planned again at once, whatever its backoff."""
    snapshot = get_snapshot(session, principal.tenant, snapshot_id)
    if snapshot.status is not SnapshotStatus.candidate:
        raise Conflict(
            f"snapshot {snapshot.served_name} is {snapshot.status.value}; only candidates are "
            "evaluated",
            snapshot_id=snapshot.id,
            current_status=snapshot.status.value,
        )
    options = EvalOptions(k=body.k, max_items=body.max_items, breakdown_key=body.breakdown_key,
                          seed=body.seed, max_tokens=body.max_tokens)
    try:
        plan_evaluation(session, snapshot.id, options)  # reads only: refuse what cannot run
    except EvaluationError as exc:
        raise Conflict(str(exc), snapshot_id=snapshot.id) from exc
    job = enqueue(
        session, JobKind.eval, eval_job_key(snapshot.id),
        {"snapshot_id": snapshot.id, "options": dataclasses.asdict(options),
         "actor": principal.actor},
        replan_now=True,
    )
    return EvalJobOut(job_id=job.id, snapshot_id=snapshot.id, status=job.status.value,
                      attempts=job.attempts, replans=job.replans,
                      evaluations_url=f"/v1/snapshots/{snapshot.id}/evaluations")


def approve(
    session: Session,
    principal: Principal,
    snapshot_id: int,
    body: ApproveIn,
    settings: Settings,
    engine: ServingEngine | None = None,
) -> PromotionResult:
    """Record the approval, then promote at once; a failed promotion is a state, not an error."""
    snapshot = get_snapshot(session, principal.tenant, snapshot_id)
    transition(
        session,
        snapshot,
        SnapshotStatus.approved,
        actor=principal.actor,
        reason=body.comment or "approved",
        tenant=principal.tenant,
    )
    session.commit()
    engine = engine or engine_for(settings, snapshot.policy.base_model)
    return promote(session, snapshot.id, engine, actor=principal.actor, reason=body.comment)


def reject(session: Session, principal: Principal, snapshot_id: int, body: RejectIn) -> Snapshot:
    snapshot = get_snapshot(session, principal.tenant, snapshot_id)
    return transition(
        session,
        snapshot,
        SnapshotStatus.rejected,
        actor=principal.actor,
        reason=body.comment,
        tenant=principal.tenant,
    )


def rollback_policy(
    session: Session,
    principal: Principal,
    policy_name: str,
    body: RollbackIn,
    settings: Settings,
    engine: ServingEngine | None = None,
) -> PromotionResult:
    policy = get_policy(session, principal.tenant, policy_name)
    engine = engine or engine_for(settings, policy.base_model)
    return rollback(session, policy, engine, actor=principal.actor, reason=body.reason)


def list_audit_events(
    session: Session,
    tenant: str,
    *,
    action: str | None = None,
    entity_type: str | None = None,
    entity_id: str | None = None,
    actor: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    cursor: int | None = None,
    limit: int = 50,
) -> AuditPage:
    """Newest first; ``action`` ending in ``.`` or ``*`` matches a prefix (``snapshot.*``)."""
    if not 1 <= limit <= 500:
        raise InvalidInput("limit must be between 1 and 500")
    q = select(AuditEvent).where(AuditEvent.tenant == tenant)
    if action:
        if action.endswith(("*", ".")):
            q = q.where(AuditEvent.action.startswith(action.rstrip("*"), autoescape=True))
        else:
            q = q.where(AuditEvent.action == action)
    if entity_type:
        q = q.where(AuditEvent.entity_type == entity_type)
    if entity_id:
        q = q.where(AuditEvent.entity_id == entity_id)
    if actor:
        q = q.where(AuditEvent.actor.contains(actor, autoescape=True))
    if since:
        q = q.where(AuditEvent.created_at >= since)
    if until:
        q = q.where(AuditEvent.created_at < until)
    if cursor is not None:
        q = q.where(AuditEvent.id < cursor)
    rows = list(session.scalars(q.order_by(AuditEvent.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return AuditPage(
        items=[AuditEventOut.model_validate(r, from_attributes=True) for r in rows],
        next_cursor=rows[-1].id if more and rows else None,
    )
