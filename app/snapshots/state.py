"""The snapshot state machine: the one function that changes a snapshot's status.

It consults ``SNAPSHOT_TRANSITIONS`` (next to the enum in ``app.models``), refuses anything else
with ``IllegalTransition`` (409) and writes an audit event for every change: who, when, why,
before and after. Kept apart from ``service`` so the gate and promotion (``gate.py``,
``promotion.py``) use it without importing the service that sits on top of them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit import record
from app.errors import IllegalTransition
from app.models import SNAPSHOT_TRANSITIONS, Policy, Snapshot, SnapshotStatus


def can_transition(current: SnapshotStatus, target: SnapshotStatus) -> bool:
    return target in SNAPSHOT_TRANSITIONS[current]


def audit_view(snapshot: Snapshot) -> dict[str, Any]:
    return {
        "status": snapshot.status.value,
        "status_reason": snapshot.status_reason,
        "version": snapshot.version,
        "served_name": snapshot.served_name,
    }


def transition(
    session: Session,
    snapshot: Snapshot,
    target: SnapshotStatus,
    *,
    actor: str,
    reason: str | None = None,
    tenant: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Snapshot:
    """Move ``snapshot`` to ``target`` or raise ``IllegalTransition``; audited either way only on
    success (a refused transition changes nothing)."""
    current = snapshot.status
    if not can_transition(current, target):
        allowed = sorted(s.value for s in SNAPSHOT_TRANSITIONS[current]) or ["none"]
        raise IllegalTransition(
            f"snapshot {snapshot.served_name} is {current.value}; it cannot become "
            f"{target.value} (allowed: {', '.join(allowed)})",
            snapshot_id=snapshot.id,
            current_status=current.value,
            target=target.value,
        )
    before = audit_view(snapshot)
    snapshot.status = target
    snapshot.status_reason = reason
    if tenant is None:
        policy = session.get(Policy, snapshot.policy_id)
        tenant = policy.tenant if policy is not None else ""
    record(
        session,
        tenant,
        actor,
        f"snapshot.{target.value}",
        "snapshot",
        snapshot.id,
        before=before,
        after=audit_view(snapshot) | (extra or {}),
        reason=reason,
    )
    session.flush()
    return snapshot


def supersede_stale_candidates(session: Session, policy: Policy, *, actor: str) -> list[int]:
    """Candidates trained from a snapshot that no longer serves get their verdict: superseded.
    (Their numbers would compare a child of the old champion against the new one.)"""
    stale = list(session.scalars(
        select(Snapshot).where(
            Snapshot.policy_id == policy.id,
            Snapshot.status == SnapshotStatus.candidate,
            Snapshot.parent_id != policy.serving_snapshot_id,
        )
    ))
    serving = session.get(Snapshot, policy.serving_snapshot_id or -1)
    for snapshot in stale:
        parent = session.get(Snapshot, snapshot.parent_id or -1)
        transition(
            session, snapshot, SnapshotStatus.superseded, actor=actor, tenant=policy.tenant,
            reason=f"trained from {parent.served_name if parent else 'a retired snapshot'}; "
                   f"{serving.served_name if serving else 'another snapshot'} serves now",
        )
    return [s.id for s in stale]
