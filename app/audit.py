"""The audit log: who did what to which entity, when, why, with the state before and after."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.models import AuditEvent


def record(
    session: Session,
    tenant: str,
    actor: str,
    action: str,
    entity_type: str,
    entity_id: int | str,
    *,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    reason: str | None = None,
) -> AuditEvent:
    event = AuditEvent(
        tenant=tenant, actor=actor, action=action, entity_type=entity_type,
        entity_id=str(entity_id), before=before or {}, after=after or {}, reason=reason,
    )
    session.add(event)
    return event
