"""Celery beat with one entry per policy, its crontab read from the database.

Run exactly one beat per deployment::

    celery -A workers.celery_app beat -S workers.beat:DatabaseScheduler

Each policy with a ``schedule`` gets an entry that sends ``tracelearn.policy_tick(policy_id)``;
what a tick does is the domain's (``app.schedules.service.tick_policy``). Crontabs are parsed
with croniter, so a sixth field (seconds) works too — handy in tests. A static entry runs the
reaper every ``reaper_interval_s``. Policies are re-read every ``REFRESH_S`` seconds: a changed
schedule takes effect without restarting beat.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from celery.beat import ScheduleEntry, Scheduler
from celery.schedules import BaseSchedule, schedstate
from croniter import croniter

from app.schedules.service import scheduled_policies
from app.settings import get_settings

log = logging.getLogger(__name__)

REFRESH_S = 5.0


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
    entries: dict[str, dict[str, Any]] = {}
    for pid, name, expr in scheduled_policies():
        try:
            schedule = CronSchedule(expr)
        except ValueError:
            log.warning("policy %s has an invalid schedule %r; skipped", name, expr)
            continue
        entries[f"policy:{name}"] = {
            "task": "tracelearn.policy_tick",
            "schedule": schedule,
            "args": (pid,),
            "options": {"queue": "maintenance"},
        }
    return entries


def static_entries() -> dict[str, dict[str, Any]]:
    return {
        "reaper": {
            "task": "tracelearn.reap",
            "schedule": float(get_settings().reaper_interval_s),
            "options": {"queue": "maintenance"},
        },
        "retention": {
            "task": "tracelearn.retention",
            "schedule": float(get_settings().retention_interval_s),
            "options": {"queue": "maintenance"},
        },
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
