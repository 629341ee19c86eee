"""Per-tenant settings: read with their defaults, changed by an admin (audited), and the PII
redactor they call for."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit import record
from app.auth.service import Principal
from app.cache import GenerationCache
from app.db import upsert_insert, utcnow
from app.models import Tenant
from app.settings import get_settings
from app.tenants.schemas import TenantOut, TenantUpdate
from app.traces.redaction import RedactionMode, Redactor, hash_key

# Read on every ingest: cached per process under the ``policies`` counter, which a trigger on
# ``tenants`` bumps (migration 0008), so a mode change applies from the very next request.
_modes: GenerationCache[str, RedactionMode] = GenerationCache("policies")


def _load_modes(session: Session, names: set[str]) -> dict[str, RedactionMode]:
    return dict(session.execute(
        select(Tenant.name, Tenant.redaction_mode).where(Tenant.name.in_(names))).tuples().all())


def redaction_mode(session: Session, tenant: str) -> RedactionMode:
    found = _modes.get_many(session, [tenant], lambda names: _load_modes(session, names))
    return found.get(tenant, RedactionMode.mask)


def redaction_key(tenant: str) -> bytes:
    """The tenant's hash-mode token key: the same value gives the same token within a tenant
    and unrelated tokens across tenants."""
    settings = get_settings()
    return hash_key(settings.pii_hash_secret or settings.session_secret, tenant)


def redactor(mode: RedactionMode, tenant: str) -> Redactor | None:
    """The redactor for ``mode`` (None for ``off``), hash tokens keyed per tenant."""
    return Redactor.for_mode(mode, redaction_key(tenant) if mode is RedactionMode.hash else None)


def get_tenant(session: Session, tenant: str) -> TenantOut:
    row = session.get(Tenant, tenant)
    if row is None:
        return TenantOut(name=tenant, redaction_mode=RedactionMode.mask, updated_at=None)
    return TenantOut(name=row.name, redaction_mode=row.redaction_mode, updated_at=row.updated_at)


def update_tenant(session: Session, principal: Principal, data: TenantUpdate) -> TenantOut:
    before = get_tenant(session, principal.tenant)
    changes = data.model_dump(exclude_unset=True, exclude_none=True)
    if not changes:
        return before
    now = utcnow()
    table = Tenant.__table__
    # One statement whether or not the row exists yet: two admins changing a fresh tenant at
    # once must not collide on the primary key.
    session.execute(
        upsert_insert(session, table)
        .values(name=principal.tenant, created_at=now, updated_at=now,
                **{"redaction_mode": before.redaction_mode.value} | changes)
        .on_conflict_do_update(index_elements=["name"], set_={**changes, "updated_at": now})
    )
    session.expire_all()
    after = get_tenant(session, principal.tenant)
    record(session, principal.tenant, principal.actor, "tenant.update", "tenant",
           principal.tenant, before=before.model_dump(mode="json"),
           after=after.model_dump(mode="json"))
    return after
