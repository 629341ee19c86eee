"""Hot-loading a snapshot into serving, and rolling back.

    approved ──▶ deploying ──verify sha256──▶ load `{policy}-v{N}` ──▶ /v1/models lists it
             ──▶ canary request answers ──▶ one transaction: champion → retired,
                 candidate → serving, policy.serving_snapshot_id ← candidate

The engine work happens between two short transactions, so the database never holds a lock while
a model loads. Any failure before the flip leaves the champion serving untouched and the candidate
``failed`` with the reason. Rollback runs the same checks for the previous serving snapshot; if
they fail, nothing changes (the old snapshot stays ``retired``, still a rollback target).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit import record
from app.db import session_scope
from app.engines import engine_for
from app.errors import Conflict, NotFound, ServiceUnavailable
from app.jobs.service import JobContext, PermanentJobError
from app.models import AuditEvent, Policy, Snapshot, SnapshotStatus, Split, Trace
from app.observability import ops
from app.settings import get_settings
from app.snapshots.state import supersede_stale_candidates, transition
from workers.inference.base import SamplingParams, UnknownAdapterError
from workers.inference.serving import EngineError, EngineUnavailable, ServingEngine
from workers.learner.adapters import AdapterIntegrityError, load_verified

log = logging.getLogger(__name__)

CANARY_PARAMS = SamplingParams(max_tokens=16, temperature=0.0, seed=0)
FALLBACK_CANARY = [{"role": "user", "content": "Reply with OK."}]


class PromotionError(RuntimeError):
    """One promotion step failed; the message says which and why."""

    def __init__(self, step: str, message: str, *, engine_down: bool = False) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.engine_down = engine_down


@dataclass(frozen=True)
class PromotionResult:
    snapshot_id: int
    ok: bool
    status: SnapshotStatus
    reason: str | None
    previous_snapshot_id: int | None


def canary_messages(session: Session, policy: Policy) -> list[dict[str, str]]:
    """A real held-out prompt of the policy (what production looks like), else a fixed one."""
    messages = session.scalar(
        select(Trace.messages)
        .where(Trace.policy_id == policy.id, Trace.split == Split.heldout)
        .order_by(Trace.id)
        .limit(1)
    )
    if not messages:
        return FALLBACK_CANARY
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]


def verify_adapter(snapshot: Snapshot) -> None:
    """The adapter on disk must match both its manifest and the sha256 recorded at training."""
    if snapshot.adapter_path is None:
        return
    try:
        manifest = load_verified(snapshot.adapter_path)
    except (AdapterIntegrityError, OSError, ValueError) as exc:
        raise PromotionError("verify", str(exc)) from exc
    recorded = snapshot.adapter_sha256
    if recorded and manifest.get("weights_sha256") != recorded:
        raise PromotionError(
            "verify",
            f"adapter weights sha256 {str(manifest.get('weights_sha256'))[:12]}… differ from the "
            f"recorded {recorded[:12]}…",
        )


def bring_up(engine: ServingEngine, snapshot: Snapshot, canary: list[dict[str, str]]) -> None:
    """Verify, load, confirm the listing, run the canary; raise ``PromotionError`` on any fault."""
    verify_adapter(snapshot)
    model = snapshot.served_name if snapshot.adapter_path else None
    try:
        if snapshot.adapter_path is not None:
            engine.load_adapter(snapshot.served_name, snapshot.adapter_path)
            listed = engine.list_models()
            if snapshot.served_name not in listed:
                raise PromotionError(
                    "confirm", f"{snapshot.served_name} is not among the engine's models {listed}"
                )
        out = engine.complete(model, canary, CANARY_PARAMS)
    except PromotionError:
        raise
    except EngineUnavailable as exc:
        raise PromotionError("engine", str(exc), engine_down=True) from exc
    except (EngineError, UnknownAdapterError) as exc:
        raise PromotionError("load", str(exc)) from exc
    except Exception as exc:  # the canary must not take the API down with it
        raise PromotionError("canary", f"{type(exc).__name__}: {exc}") from exc
    if out.completion_tokens < 1 or out.finish_reason not in ("stop", "length"):
        raise PromotionError(
            "canary",
            f"the canary answered {out.completion_tokens} tokens with finish reason "
            f"{out.finish_reason!r}",
        )


def _flip(
    session: Session, policy_id: int, snapshot_id: int, actor: str, reason: str | None,
    *, rollback: bool = False,
) -> int | None:
    """The one transaction that changes what serves: champion retired, snapshot serving. On a
    rollback the champion becomes ``rolled_back`` (never a rollback target again)."""
    policy = session.scalars(
        select(Policy).where(Policy.id == policy_id).with_for_update()
    ).one()
    snapshot = session.get(Snapshot, snapshot_id)
    assert snapshot is not None
    previous_id = policy.serving_snapshot_id
    if previous_id is not None and previous_id != snapshot.id:
        previous = session.get(Snapshot, previous_id)
        if previous is not None and previous.status is SnapshotStatus.serving:
            transition(
                session,
                previous,
                SnapshotStatus.rolled_back if rollback else SnapshotStatus.retired,
                actor=actor,
                reason=(f"rolled back to {snapshot.served_name}" if rollback
                        else f"replaced by {snapshot.served_name}"),
                tenant=policy.tenant,
            )
    transition(
        session,
        snapshot,
        SnapshotStatus.serving,
        actor=actor,
        reason=reason,
        tenant=policy.tenant,
        extra={"replaced_snapshot_id": previous_id},
    )
    policy.serving_snapshot_id = snapshot.id
    supersede_stale_candidates(session, policy, actor=actor)
    record(
        session,
        policy.tenant,
        actor,
        "policy.serving_changed",
        "policy",
        policy.id,
        before={"serving_snapshot_id": previous_id},
        after={"serving_snapshot_id": snapshot.id, "served_name": snapshot.served_name},
        reason=reason,
    )
    session.commit()
    return previous_id


def promote(
    session: Session,
    snapshot_id: int,
    engine: ServingEngine,
    *,
    actor: str,
    reason: str | None = None,
) -> PromotionResult:
    """Promote an ``approved`` snapshot into serving; failures are recorded, not raised."""
    snapshot = session.get(Snapshot, snapshot_id)
    if snapshot is None:
        raise NotFound(f"no snapshot with id {snapshot_id}")
    policy = snapshot.policy
    transition(session, snapshot, SnapshotStatus.deploying, actor=actor, reason=reason)
    # Commit so the dashboard shows "deploying" while the engine loads.
    session.commit()
    champion_id = policy.serving_snapshot_id
    try:
        bring_up(engine, snapshot, canary_messages(session, policy))
    except PromotionError as exc:
        return _fail(session, snapshot, engine, actor, str(exc), champion_id)
    previous = _flip(session, policy.id, snapshot.id, actor, reason)
    ops.info("promotion", snapshot=snapshot.served_name, previous_snapshot_id=previous,
             actor=actor)
    return PromotionResult(snapshot.id, True, SnapshotStatus.serving, None, previous)


def _fail(
    session: Session,
    snapshot: Snapshot,
    engine: ServingEngine,
    actor: str,
    why: str,
    champion_id: int | None,
) -> PromotionResult:
    session.rollback()
    snapshot = session.get(Snapshot, snapshot.id) or snapshot
    transition(session, snapshot, SnapshotStatus.failed, actor=actor, reason=why)
    session.commit()
    if snapshot.adapter_path is not None:
        try:
            # A half-loaded adapter must not linger under a name nobody will ever reuse.
            engine.unload_adapter(snapshot.served_name)
        except Exception:
            log.warning("could not unload %s after a failed promotion", snapshot.served_name)
    ops.warning("promotion.failed", snapshot=snapshot.served_name, reason=why)
    return PromotionResult(snapshot.id, False, SnapshotStatus.failed, why, champion_id)


def previous_serving(session: Session, policy: Policy) -> Snapshot | None:
    """The rollback target: the most recently retired snapshot (replaced by a promotion). A
    snapshot rolled back from is ``rolled_back``, never a target, so a further rollback walks back
    through the serving history instead of toggling."""
    retired = {
        s.id: s
        for s in session.scalars(
            select(Snapshot).where(
                Snapshot.policy_id == policy.id, Snapshot.status == SnapshotStatus.retired
            )
        )
    }
    if not retired:
        return None
    last = session.scalar(
        select(AuditEvent.entity_id)
        .where(
            AuditEvent.action == "snapshot.retired",
            AuditEvent.entity_type == "snapshot",
            AuditEvent.entity_id.in_([str(i) for i in retired]),
        )
        .order_by(AuditEvent.created_at.desc(), AuditEvent.id.desc())
        .limit(1)
    )
    if last is not None:
        return retired[int(last)]
    return max(retired.values(), key=lambda s: s.version)


def rollback(
    session: Session,
    policy: Policy,
    engine: ServingEngine,
    *,
    actor: str,
    reason: str | None = None,
) -> PromotionResult:
    """Serve the previous snapshot again; raise (and change nothing) if it cannot be served."""
    target = previous_serving(session, policy)
    if target is None:
        raise Conflict(
            f"policy {policy.name!r} has no previously serving snapshot to roll back to"
        )
    current_id = policy.serving_snapshot_id
    why = reason or "rollback"
    try:
        bring_up(engine, target, canary_messages(session, policy))
    except PromotionError as exc:
        record(
            session,
            policy.tenant,
            actor,
            "policy.rollback_failed",
            "policy",
            policy.id,
            before={"serving_snapshot_id": current_id},
            after={"serving_snapshot_id": current_id, "target_snapshot_id": target.id},
            reason=str(exc),
        )
        session.commit()
        error = ServiceUnavailable if exc.engine_down else Conflict
        raise error(
            f"rollback to {target.served_name} failed, {policy.name!r} still serves the current "
            f"snapshot: {exc}",
            target_snapshot_id=target.id,
        ) from exc
    transition(session, target, SnapshotStatus.deploying, actor=actor, reason=why)
    previous = _flip(session, policy.id, target.id, actor, why, rollback=True)
    ops.info("promotion", snapshot=target.served_name, previous_snapshot_id=previous,
             actor=actor, rollback=True)
    return PromotionResult(target.id, True, SnapshotStatus.serving, None, previous)

# --- the promote job (approvals recorded out of band, retries after an engine outage) ----------


def handle_promote_job(ctx: JobContext) -> dict[str, Any]:
    snapshot_id = int(ctx.payload["snapshot_id"])
    actor = str(ctx.payload.get("actor") or "system:promote")
    with session_scope() as session:
        snapshot = session.get(Snapshot, snapshot_id)
        if snapshot is None:
            raise PermanentJobError(f"snapshot {snapshot_id} does not exist")
        if snapshot.status is not SnapshotStatus.approved:
            # Already promoted, failed, or never approved: nothing for this job to do.
            return {"snapshot_id": snapshot_id, "status": snapshot.status.value, "skipped": True}
        ctx.check()
        engine = engine_for(get_settings(), snapshot.policy.base_model)
        result = promote(session, snapshot_id, engine, actor=actor,
                         reason=ctx.payload.get("reason"))
        return {"snapshot_id": snapshot_id, "status": result.status.value, "ok": result.ok,
                "reason": result.reason, "previous_snapshot_id": result.previous_snapshot_id}
