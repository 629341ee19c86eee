from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends, Query
from sqlalchemy.orm import Session

from app.auth.service import Principal, Scope
from app.dependencies import SessionDep, require
from app.models import Policy, Snapshot
from app.settings import get_settings
from app.snapshots import service
from app.snapshots.promotion import PromotionResult
from app.snapshots.schemas import (
    ApproveIn,
    AuditPage,
    EvalJobOut,
    EvaluateIn,
    EvaluationOut,
    PromotionOut,
    RejectIn,
    RollbackIn,
    SnapshotOut,
)

router = APIRouter(tags=["snapshots"])


def _promotion_out(session: Session, result: PromotionResult) -> PromotionOut:
    snapshot = session.get(Snapshot, result.snapshot_id)
    assert snapshot is not None
    session.refresh(snapshot)
    policy = session.get(Policy, snapshot.policy_id)
    assert policy is not None
    session.refresh(policy)
    return PromotionOut(
        snapshot=service.to_out(snapshot, policy),
        promoted=result.ok,
        reason=result.reason,
        previous_snapshot_id=result.previous_snapshot_id,
        serving_snapshot_id=policy.serving_snapshot_id,
    )


@router.get("/policies/{name}/snapshots", response_model=list[SnapshotOut])
def list_snapshots(
    session: SessionDep,
    name: str,
    principal: Principal = Depends(require(Scope.read)),
) -> list[SnapshotOut]:
    return [service.to_out(s) for s in service.list_snapshots(session, principal.tenant, name)]


@router.get("/snapshots/{snapshot_id}", response_model=SnapshotOut)
def get_snapshot(
    session: SessionDep,
    snapshot_id: int,
    principal: Principal = Depends(require(Scope.read)),
) -> SnapshotOut:
    return service.to_out(service.get_snapshot(session, principal.tenant, snapshot_id))


@router.get("/snapshots/{snapshot_id}/evaluations", response_model=list[EvaluationOut])
def list_evaluations(
    session: SessionDep,
    snapshot_id: int,
    principal: Principal = Depends(require(Scope.read)),
) -> list[EvaluationOut]:
    rows = service.list_evaluations(session, principal.tenant, snapshot_id)
    return [service.evaluation_out(r) for r in rows]


@router.post("/snapshots/{snapshot_id}/evaluate", response_model=EvalJobOut, status_code=202)
def evaluate(
    session: SessionDep,
    snapshot_id: int,
    body: EvaluateIn | None = None,
    principal: Principal = Depends(require(Scope.admin)),
) -> EvalJobOut:
    return service.evaluate(session, principal, snapshot_id, body or EvaluateIn())


@router.post("/snapshots/{snapshot_id}/approve", response_model=PromotionOut)
def approve(
    session: SessionDep,
    snapshot_id: int,
    body: ApproveIn | None = None,
    principal: Principal = Depends(require(Scope.admin)),
) -> PromotionOut:
    result = service.approve(session, principal, snapshot_id, body or ApproveIn(), get_settings())
    return _promotion_out(session, result)


@router.post("/snapshots/{snapshot_id}/reject", response_model=SnapshotOut)
def reject(
    session: SessionDep,
    snapshot_id: int,
    body: RejectIn,
    principal: Principal = Depends(require(Scope.admin)),
) -> SnapshotOut:
    return service.to_out(service.reject(session, principal, snapshot_id, body))


@router.post("/policies/{name}/rollback", response_model=PromotionOut)
def rollback(
    session: SessionDep,
    name: str,
    body: RollbackIn | None = None,
    principal: Principal = Depends(require(Scope.admin)),
) -> PromotionOut:
    result = service.rollback_policy(session, principal, name, body or RollbackIn(), get_settings())
    return _promotion_out(session, result)


@router.get("/audit-events", response_model=AuditPage)
def list_audit_events(
    session: SessionDep,
    action: str | None = Query(default=None, max_length=64,
                               description="Exact action, or a prefix ending in `*`."),
    entity_type: str | None = Query(default=None, max_length=64),
    entity_id: str | None = Query(default=None, max_length=64),
    actor: str | None = Query(default=None, max_length=200, description="Substring of the actor."),
    since: datetime | None = None,
    until: datetime | None = None,
    cursor: int | None = None,
    limit: int = Query(default=50, ge=1, le=500),
    principal: Principal = Depends(require(Scope.read)),
) -> AuditPage:
    return service.list_audit_events(
        session, principal.tenant, action=action, entity_type=entity_type, entity_id=entity_id,
        actor=actor, since=since, until=until, cursor=cursor, limit=limit,
    )
