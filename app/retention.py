"""Retention: delete traces older than ``settings.retention_days``, and receiver pieces that
waited longer than ``settings.staging_retention_hours`` for their other half.

Each trace goes the way ``DELETE /v1/traces/{id}`` takes it (``traces.service.delete_trace``):
its rollouts, groups and outcomes go with it, and a ``trace.delete`` audit event records which
training runs, and so which adapters, were trained on it, because the adapters themselves stay.
One ``retention.purge`` event per tenant summarises the pass.

``retention_pass(settings)`` is one pass in its own transaction: beat sends it every
``retention_interval_s`` (``tracelearn.retention``), ``tracelearn retention`` runs it by hand.
Deletion proceeds in batches (oldest first) so a long backlog is not one giant statement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.audit import record
from app.auth.service import Principal, Scope
from app.db import session_scope, utcnow
from app.models import LangfuseObservation, Trace, TrainingRun
from app.settings import Settings
from app.traces.service import delete_trace

ACTOR = "system:retention"


@dataclass(frozen=True)
class _RetentionPrincipal(Principal):
    """The retention job acting inside one tenant; audit rows name it, not an API key."""

    @property
    def actor(self) -> str:
        return ACTOR


@dataclass
class RetentionReport:
    cutoff: datetime | None
    deleted: int = 0
    rollouts_deleted: int = 0
    by_tenant: dict[str, int] = field(default_factory=dict)
    # Training runs and adapters (snapshots) that had seen a now-deleted trace.
    training_run_ids: list[int] = field(default_factory=list)
    adapter_snapshot_ids: list[int] = field(default_factory=list)
    staged_deleted: int = 0
    """Receiver pieces (``langfuse_observations`` rows) deleted for waiting too long."""

    def as_dict(self) -> dict[str, object]:
        return {
            "cutoff": self.cutoff.isoformat() if self.cutoff else None,
            "staged_deleted": self.staged_deleted,
            "deleted": self.deleted,
            "rollouts_deleted": self.rollouts_deleted,
            "by_tenant": dict(self.by_tenant),
            "training_run_ids": list(self.training_run_ids),
            "adapter_snapshot_ids": list(self.adapter_snapshot_ids),
        }


def purge_expired(
    session: Session,
    settings: Settings,
    *,
    now: datetime | None = None,
    batch_size: int = 500,
    limit: int | None = None,
) -> RetentionReport:
    """Delete every trace created before ``now - retention_days`` (nothing when retention is
    off). ``limit`` caps one pass (the next pass continues); returns what was deleted."""
    if settings.retention_days is None:
        return RetentionReport(cutoff=None)
    cutoff = (now or utcnow()) - timedelta(days=settings.retention_days)
    report = RetentionReport(cutoff=cutoff)
    # Per tenant: one tenant's audit log must not name another tenant's runs.
    runs: dict[str, set[int]] = {}
    while limit is None or report.deleted < limit:
        take = batch_size if limit is None else min(batch_size, limit - report.deleted)
        rows = session.execute(
            select(Trace.id, Trace.tenant)
            .where(Trace.created_at < cutoff)
            .order_by(Trace.created_at, Trace.id)
            .limit(take)
        ).all()
        if not rows:
            break
        for trace_id, tenant in rows:
            principal = _RetentionPrincipal(
                key_id=0, tenant=tenant, scopes=frozenset({Scope.admin}), name="retention"
            )
            deleted = delete_trace(
                session, principal, trace_id,
                reason=f"retention: created before {cutoff.isoformat()} "
                f"({settings.retention_days} days)",
            )
            report.deleted += 1
            report.rollouts_deleted += deleted.rollouts_deleted
            report.by_tenant[tenant] = report.by_tenant.get(tenant, 0) + 1
            runs.setdefault(tenant, set()).update(deleted.training_run_ids)
        session.flush()
    all_runs: set[int] = set()
    all_adapters: set[int] = set()
    for tenant, n in sorted(report.by_tenant.items()):
        tenant_runs = runs.get(tenant, set())
        adapters = _adapters_of_runs(session, tenant_runs)
        all_runs |= tenant_runs
        all_adapters |= adapters
        record(
            session, tenant, ACTOR, "retention.purge", "trace", "*",
            after={"deleted": n, "cutoff": cutoff.isoformat(),
                   "retention_days": settings.retention_days,
                   "training_run_ids": sorted(tenant_runs),
                   "adapter_snapshot_ids": sorted(adapters)},
            reason=f"traces older than {settings.retention_days} days",
        )
    report.training_run_ids = sorted(all_runs)
    report.adapter_snapshot_ids = sorted(all_adapters)
    return report


def purge_staged(session: Session, settings: Settings, *, now: datetime | None = None) -> int:
    """Delete the receiver pieces not updated for ``staging_retention_hours``: a Langfuse
    generation whose output never came, OTLP log events whose span never came, a content-less
    span's staging row (its trace stays, only late events can no longer fill it in). Returns the
    number deleted."""
    cutoff = (now or utcnow()) - timedelta(hours=settings.staging_retention_hours)
    result = session.execute(
        delete(LangfuseObservation).where(LangfuseObservation.updated_at < cutoff),
        execution_options={"synchronize_session": False},
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]  # a DML Result has rowcount


def retention_pass(settings: Settings, *, limit: int | None = None) -> RetentionReport:
    """One retention pass, committed: expired traces (when ``retention_days`` is set), then
    stale receiver pieces."""
    with session_scope() as session:
        report = purge_expired(session, settings, limit=limit)
        report.staged_deleted = purge_staged(session, settings)
    return report


def _adapters_of_runs(session: Session, run_ids: set[int]) -> set[int]:
    if not run_ids:
        return set()
    return {
        sid
        for sid in session.scalars(
            select(TrainingRun.output_snapshot_id).where(TrainingRun.id.in_(run_ids))
        )
        if sid is not None
    }
