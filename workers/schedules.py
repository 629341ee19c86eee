"""Schedules: Celery beat with one entry per policy, its crontab read from the database.

Run exactly one beat per deployment::

    celery -A workers.celery_app beat -S workers.schedules:DatabaseScheduler

Each policy with a ``schedule`` gets an entry that sends ``tracelearn.policy_tick(policy_id)``;
the tick (on a worker) does the policy's periodic work:

1. regenerate: enqueue rollout jobs for pending traces (their grade jobs follow automatically);
2. train, when the data trigger holds: at least ``training_config['min_groups']`` graded,
   non-zero-variance groups from the serving snapshot that no succeeded run has used;
3. evaluate every candidate snapshot that has no evaluation yet.

Crontabs are parsed with croniter, so a sixth field (seconds) works too — handy in tests.
A static entry runs the reaper every ``reaper_interval_s``. Policies are re-read every
``REFRESH_S`` seconds: a changed schedule takes effect without restarting beat.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from celery.beat import ScheduleEntry, Scheduler
from celery.schedules import BaseSchedule, schedstate
from croniter import croniter
from sqlalchemy import exists, select

from app.db import session_scope
from app.errors import Conflict, DomainError
from app.models import Evaluation, JobKind, Policy, Snapshot, SnapshotStatus
from app.settings import get_settings
from workers.jobs.service import enqueue

log = logging.getLogger(__name__)

REFRESH_S = 5.0
DEFAULT_MIN_GROUPS = 16


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


class CronSchedule(BaseSchedule):
    """A crontab (5 fields, or 6 with seconds) evaluated by croniter, in UTC."""

    def __init__(self, expr: str, app: Any = None) -> None:
        if not croniter.is_valid(expr):
            raise ValueError(f"{expr!r} is not a valid crontab expression")
        self.expr = expr
        super().__init__(nowfun=lambda: datetime.now(UTC), app=app)

    def next_after(self, moment: datetime) -> datetime:
        nxt: datetime = croniter(self.expr, _aware(moment)).get_next(datetime)
        return _aware(nxt)

    def remaining_estimate(self, last_run_at: datetime) -> timedelta:
        return self.next_after(last_run_at) - self.now()

    def is_due(self, last_run_at: datetime) -> schedstate:
        now = self.now()
        due_at = self.next_after(last_run_at)
        if now >= due_at:
            return schedstate(True, max(0.0, (self.next_after(now) - now).total_seconds()))
        return schedstate(False, (due_at - now).total_seconds())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CronSchedule) and other.expr == self.expr

    def __hash__(self) -> int:
        return hash(self.expr)

    def __repr__(self) -> str:
        return f"<cron {self.expr}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.expr,))


def policy_entries() -> dict[str, dict[str, Any]]:
    """Beat entries for every policy with a valid schedule (invalid ones are logged, skipped)."""
    with session_scope() as session:
        rows = session.execute(
            select(Policy.id, Policy.name, Policy.schedule).where(Policy.schedule.is_not(None))
        ).all()
    entries: dict[str, dict[str, Any]] = {}
    for pid, name, expr in rows:
        try:
            schedule = CronSchedule(str(expr))
        except ValueError:
            log.warning("policy %s has an invalid schedule %r; skipped", name, expr)
            continue
        entries[f"policy:{name}"] = {
            "task": "tracelearn.policy_tick",
            "schedule": schedule,
            "args": (int(pid),),
            "options": {"queue": "maintenance"},
        }
    return entries


def static_entries() -> dict[str, dict[str, Any]]:
    return {
        "reaper": {
            "task": "tracelearn.reap",
            "schedule": float(get_settings().reaper_interval_s),
            "options": {"queue": "maintenance"},
        }
    }


class DatabaseScheduler(Scheduler):
    """Beat's schedule = static entries + one entry per scheduled policy, refreshed from the DB."""

    Entry = ScheduleEntry

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._last_refresh = 0.0
        super().__init__(*args, **kwargs)

    def setup_schedule(self) -> None:
        self.merge_inplace(self._wanted())
        self._last_refresh = time.monotonic()

    def _wanted(self) -> dict[str, dict[str, Any]]:
        wanted = static_entries()
        try:
            wanted |= policy_entries()
        except Exception:  # the DB is down: keep the last known policy entries
            log.exception("reading policy schedules failed")
            wanted |= {k: self._as_dict(v) for k, v in self.schedule.items() if k.startswith("policy:")}
        return wanted

    @staticmethod
    def _as_dict(entry: ScheduleEntry) -> dict[str, Any]:
        return {"task": entry.task, "schedule": entry.schedule, "args": entry.args,
                "options": entry.options}

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if time.monotonic() - self._last_refresh >= REFRESH_S:
            before = {k: (v.schedule, tuple(v.args)) for k, v in self.schedule.items()}
            self.merge_inplace(self._wanted())
            self._last_refresh = time.monotonic()
            after = {k: (v.schedule, tuple(v.args)) for k, v in self.schedule.items()}
            if before != after:
                log.info("policy schedules changed: %s", sorted(after))
                self._heap = None
        delay: float = super().tick(*args, **kwargs)
        return min(delay, REFRESH_S)

    @property
    def info(self) -> str:
        return f"    . policies from the database, refreshed every {REFRESH_S:g}s"


# --- the tick ----------------------------------------------------------------------------------


@dataclass
class TickResult:
    policy: str | None = None
    rollout_jobs: list[int] = field(default_factory=list)
    trainable_groups: int = 0
    min_groups: int = DEFAULT_MIN_GROUPS
    training_run_id: int | None = None
    training_skipped: str | None = None
    eval_jobs: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def tick_policy(policy_id: int) -> TickResult:
    """One policy's periodic work (see the module docstring); idempotent, safe to run twice."""
    from workers.rollouts.service import plan_regeneration
    from workers.training.service import active_run, count_trainable_groups, start_run

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
        unevaluated = session.scalars(
            select(Snapshot.id).where(
                Snapshot.policy_id == policy.id,
                Snapshot.status == SnapshotStatus.candidate,
                ~exists().where(Evaluation.snapshot_id == Snapshot.id),
            )
        )
        for sid in unevaluated:
            job = enqueue(session, JobKind.eval, f"eval:snapshot={sid}", {"snapshot_id": sid})
            out.eval_jobs.append(job.id)
    log.info("policy tick %s", out.as_dict())
    return out
