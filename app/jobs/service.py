"""The job table is the truth about work; Celery only delivers "go look at job N".

Life of a job::

    enqueue (same transaction as the data that needs it; dispatched_at NULL = outbox)
      └─ after commit: dispatch → broker message, dispatched_at set
    worker: claim (atomic UPDATE: queued/retrying, or running with an expired lease)
      └─ lease renewed by a heartbeat thread while the handler runs
      └─ complete → succeeded   |  fail → retrying (re-dispatched) or failed (attempts exhausted)
    reaper: running with an expired lease → retrying (or failed); undispatched rows → dispatched

A duplicate message is harmless (the claim fails), and a lost message is harmless (the reaper
re-sends), so delivery can be at-least-once everywhere.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import and_, event, or_, select, update
from sqlalchemy.orm import Session

from app.db import session_scope, storable_text, upsert_insert, utcnow
from app.models import Job, JobKind, JobStatus
from app.observability import ops
from app.settings import get_settings

log = logging.getLogger(__name__)

JobSender = Callable[[JobKind, int, float | None], None]
"""send(kind, job_id, countdown): deliver "go look at job N" to a worker (or run it eagerly)."""
_sender: JobSender | None = None
_ACTIVE = (JobStatus.queued, JobStatus.running, JobStatus.retrying)
_DISPATCH_KEY = "tracelearn_dispatch"


class LeaseLost(RuntimeError):
    """Another worker took the job over (our lease expired); stop without writing anything."""


class PermanentJobError(RuntimeError):
    """Retrying cannot help (bad configuration, missing entity): fail the job at once."""


class HandedBack(RuntimeError):
    """This process is stopping: the job goes back to the queue, the attempt not counted."""


_stopping = threading.Event()


def request_stop() -> None:
    """Ask every job running in this process to hand itself back at its next ``check()``
    (called when a worker receives TERM/INT: nothing is left ``running`` until its lease ends)."""
    _stopping.set()


def new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


# --- enqueue and dispatch (the outbox) ------------------------------------------------------------


def enqueue(
    session: Session,
    kind: JobKind,
    key: str,
    payload: dict[str, Any],
    *,
    max_attempts: int | None = None,
    dispatch: bool = True,
    replan_now: bool = False,
) -> Job:
    """Create the job for ``key`` unless it exists; return the row either way.

    The message is sent only after the caller's transaction commits, so a worker never sees a job
    whose data is not there yet, and a rolled-back transaction sends nothing. ``dispatch=False``
    is for callers that run the job themselves right away (``run_job``): the row is stamped as
    dispatched so no worker gets it, and the reaper still rescues it if that caller dies.
    """
    now = utcnow()
    stmt = (
        upsert_insert(session, Job.__table__)
        .values(
            kind=kind,
            key=key,
            status=JobStatus.queued,
            payload=payload,
            result={},
            attempts=0,
            max_attempts=max_attempts or get_settings().job_max_attempts,
            created_at=now,
            updated_at=now,
            dispatched_at=None if dispatch else now,
        )
        .on_conflict_do_nothing(index_elements=["key"])
    )
    session.execute(stmt)
    job = session.scalars(select(Job).where(Job.key == key)).one()
    if job.status is JobStatus.failed:
        _replan(session, job, now, dispatch=dispatch, ignore_backoff=replan_now)
    if dispatch and job.dispatched_at is None and job.status in (JobStatus.queued, JobStatus.retrying):
        _dispatch_after_commit(session, job.id)
    return job


def replan_due_at(job: Job) -> datetime | None:
    """When a failed job's key may be planned again; None once its re-plans are used up."""
    settings = get_settings()
    if job.status is not JobStatus.failed or job.replans >= settings.job_max_replans:
        return None
    return job.updated_at + timedelta(seconds=settings.job_replan_backoff_s * 2**job.replans)


def replans_exhausted(job: Job) -> bool:
    """The job failed and no re-plan is left: its failure is final."""
    return job.status is JobStatus.failed and job.replans >= get_settings().job_max_replans


def _replan(
    session: Session, job: Job, now: datetime, *, dispatch: bool, ignore_backoff: bool
) -> None:
    """A key names the work, not its fate: a failed job is queued again (attempts reset) once its
    backoff has passed, up to ``job_max_replans`` times; a person asking (``ignore_backoff``)
    re-plans it at once and without the cap."""
    settings = get_settings()
    if job.replans >= settings.job_max_replans and not ignore_backoff:
        return
    backoff = 0.0 if ignore_backoff else settings.job_replan_backoff_s * 2**job.replans
    cutoff = now - timedelta(seconds=backoff)
    result = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.failed, Job.updated_at <= cutoff)
        .values(status=JobStatus.queued, attempts=0, replans=Job.replans + 1,
                lease_owner=None, lease_expires_at=None, updated_at=now,
                dispatched_at=None if dispatch else now)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount == 1:  # type: ignore[attr-defined]
        session.refresh(job)
        ops.info("job.replanned", job_id=job.id, kind=job.kind.value, key=job.key,
                 replan=job.replans, last_error=job.error)


def _dispatch_after_commit(session: Session, job_id: int, countdown: float | None = None) -> None:
    pending: dict[int, float | None] | None = session.info.get(_DISPATCH_KEY)
    if pending is None:
        pending = session.info[_DISPATCH_KEY] = {}

        @event.listens_for(session, "after_commit", once=True)
        def _send(sess: Session) -> None:
            jobs = sess.info.pop(_DISPATCH_KEY, {})
            # A broker hiccup must not turn a committed transaction into an error: the rows stay
            # undispatched and the reaper sends them later.
            try:
                for jid, delay in jobs.items():
                    dispatch([jid], countdown=delay)
            except Exception:
                log.exception("dispatch after commit failed; the reaper will retry")

        @event.listens_for(session, "after_rollback", once=True)
        def _drop(sess: Session) -> None:
            sess.info.pop(_DISPATCH_KEY, None)

    pending[job_id] = countdown


def register_sender(sender: JobSender | None) -> None:
    """Install the delivery mechanism, once per process at start-up (the Celery shell's
    ``workers.tasks.send_job`` in the API, the workers and the CLI). The domain never imports the
    broker: without a sender, jobs stay undispatched rows until a process that has one sends them."""
    global _sender
    _sender = sender


def dispatch(job_ids: Iterable[int], *, countdown: float | None = None) -> int:
    """Hand jobs to the registered sender and stamp ``dispatched_at``; returns how many were sent."""
    sender = _sender
    if sender is None:
        log.warning("no job sender registered in this process; %s left for the reaper",
                    list(job_ids))
        return 0
    sent = 0
    for job_id in job_ids:
        with session_scope() as session:
            job = session.get(Job, job_id)
            if job is None or job.status not in (JobStatus.queued, JobStatus.retrying):
                continue
            kind = job.kind
        # Send first, stamp second: a crash in between re-sends (harmless), never loses.
        sender(kind, job_id, countdown)
        with session_scope() as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.dispatched_at.is_(None))
                .values(dispatched_at=utcnow())
                .execution_options(synchronize_session=False)
            )
        sent += 1
    return sent


def dispatch_pending(limit: int = 500) -> int:
    """Send every queued/retrying job that has not been handed to the broker."""
    with session_scope() as session:
        ids = list(
            session.scalars(
                select(Job.id)
                .where(
                    Job.status.in_([JobStatus.queued, JobStatus.retrying]),
                    Job.dispatched_at.is_(None),
                )
                .order_by(Job.id)
                .limit(limit)
            )
        )
    return dispatch(ids) if ids else 0


# --- the lease ---------------------------------------------------------------------------------


def claim(session: Session, job_id: int, owner: str, lease_s: float) -> Job | None:
    """Take the job if nobody holds a live lease on it and attempts remain; None otherwise."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.attempts < Job.max_attempts,
            or_(
                Job.status.in_([JobStatus.queued, JobStatus.retrying]),
                and_(Job.status == JobStatus.running, Job.lease_expires_at < now),
            ),
        )
        .values(
            status=JobStatus.running,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_s),
            heartbeat_at=now,
            attempts=Job.attempts + 1,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    job = session.get(Job, job_id, populate_existing=True)
    return job


def heartbeat(session: Session, job_id: int, owner: str, lease_s: float) -> bool:
    """Renew the lease; False when it was lost (reaped and possibly claimed by another worker)."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status == JobStatus.running)
        .values(lease_expires_at=now + timedelta(seconds=lease_s), heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def complete(session: Session, job_id: int, owner: str, result: dict[str, Any]) -> bool:
    now = utcnow()
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status == JobStatus.running)
        .values(
            status=JobStatus.succeeded,
            result=result,
            error=None,
            lease_owner=None,
            lease_expires_at=None,
            heartbeat_at=now,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1  # type: ignore[attr-defined]


def fail(
    session: Session, job_id: int, owner: str, error: str, *, retryable: bool = True
) -> JobStatus | None:
    """Record a failed attempt: ``retrying`` (and re-dispatch after commit, with backoff) while
    attempts remain, else ``failed``. None when our lease was already lost."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.lease_owner != owner or job.status != JobStatus.running:
        return None
    final = not retryable or job.attempts >= job.max_attempts
    job.status = JobStatus.failed if final else JobStatus.retrying
    job.error = storable_text(error[:8000])
    job.lease_owner = None
    job.lease_expires_at = None
    if not final:
        job.dispatched_at = None
        _dispatch_after_commit(session, job.id, countdown=min(60.0, 2.0**job.attempts))
    return job.status


# --- the reaper --------------------------------------------------------------------------------


@dataclass
class ReapResult:
    requeued: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    redispatched: int = 0


def reap(now: datetime | None = None, *, stale_dispatch_s: float = 3600.0) -> ReapResult:
    """Re-queue jobs whose lease expired (their worker died), fail those out of attempts, and
    (re-)send undispatched rows. Safe to run from many places at once: every step is one
    conditional UPDATE."""
    now = now or utcnow()
    out = ReapResult()
    with session_scope() as session:
        expired = and_(Job.status == JobStatus.running, Job.lease_expires_at < now)
        out.failed = list(
            session.scalars(
                update(Job)
                .where(expired, Job.attempts >= Job.max_attempts)
                .values(
                    status=JobStatus.failed,
                    error="lease expired (worker lost) and no attempts left",
                    lease_owner=None,
                    lease_expires_at=None,
                    updated_at=now,
                )
                .returning(Job.id)
                .execution_options(synchronize_session=False)
            )
        )
        out.requeued = list(
            session.scalars(
                update(Job)
                .where(expired, Job.attempts < Job.max_attempts)
                .values(
                    status=JobStatus.retrying,
                    error="lease expired (worker lost); re-queued",
                    lease_owner=None,
                    lease_expires_at=None,
                    dispatched_at=None,
                    updated_at=now,
                )
                .returning(Job.id)
                .execution_options(synchronize_session=False)
            )
        )
        # A message can be lost (broker flushed, never acked to a dead consumer); after a long
        # while send it again — a duplicate only fails its claim.
        session.execute(
            update(Job)
            .where(
                Job.status.in_([JobStatus.queued, JobStatus.retrying]),
                Job.dispatched_at < now - timedelta(seconds=stale_dispatch_s),
            )
            .values(dispatched_at=None)
            .execution_options(synchronize_session=False)
        )
    for job_id in out.requeued:
        log.warning("job %s lease expired; re-queued", job_id)
    for job_id in out.failed:
        log.error("job %s lease expired with no attempts left; failed", job_id)
    out.redispatched = dispatch_pending()
    return out


# --- running a job -----------------------------------------------------------------------------


@dataclass
class JobContext:
    """What a handler gets: the job's identity and payload, and its lease."""

    job_id: int
    kind: JobKind
    payload: dict[str, Any]
    attempt: int
    owner: str
    lease_s: float
    max_attempts: int = 1
    _lost: threading.Event = field(default_factory=threading.Event)

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def check(self) -> None:
        """Call between units of work and before writing results: raises ``HandedBack`` when
        this process is stopping and ``LeaseLost`` if another worker took over."""
        if _stopping.is_set():
            raise HandedBack(f"job {self.job_id}: handed back, the worker is stopping")
        if self._lost.is_set():
            raise LeaseLost(f"job {self.job_id}: lease lost")
        with session_scope() as session:
            if not heartbeat(session, self.job_id, self.owner, self.lease_s):
                self._lost.set()
                raise LeaseLost(f"job {self.job_id}: lease lost")


class _LeaseKeeper:
    """Renews the lease every lease/3 seconds in a daemon thread while the handler runs."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"lease-{ctx.job_id}", daemon=True
        )

    def _loop(self) -> None:
        interval = max(0.5, self.ctx.lease_s / 3)
        while not self._stop.wait(interval):
            try:
                with session_scope() as session:
                    ok = heartbeat(session, self.ctx.job_id, self.ctx.owner, self.ctx.lease_s)
            except Exception:  # a DB blip: try again next tick; the lease has slack for it
                log.warning("heartbeat for job %s failed", self.ctx.job_id, exc_info=True)
                continue
            if not ok:
                self.ctx._lost.set()
                return

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


Handler = Callable[[JobContext], dict[str, Any]]
RunOutcome = Literal["succeeded", "skipped", "retrying", "failed", "lease-lost", "handed-back"]


def run_job(
    job_id: int, handler: Handler, *, owner: str | None = None, lease_s: float | None = None
) -> RunOutcome:
    """Claim job ``job_id``, run ``handler`` under a renewed lease, record the outcome.

    ``skipped``: the job is done, failed for good, or held by a live lease elsewhere — a duplicate
    delivery exits here without writing.
    """
    owner = owner or new_owner()
    lease = float(lease_s or get_settings().job_lease_s)
    with session_scope() as session:
        job = claim(session, job_id, owner, lease)
        if job is None:
            return "skipped"
        ctx = JobContext(
            job.id, job.kind, dict(job.payload), job.attempts, owner, lease, job.max_attempts
        )
    started = time.monotonic()
    ops.info("job.started", job_id=job_id, kind=ctx.kind.value, attempt=ctx.attempt)
    try:
        with _LeaseKeeper(ctx):
            result = handler(ctx)
    except LeaseLost:
        log.warning("job %s: lease lost; leaving it to the new owner", job_id)
        return "lease-lost"
    except HandedBack:
        with session_scope() as session:
            hand_back(session, job_id, owner)
        ops.info("job.handed_back", job_id=job_id, kind=ctx.kind.value)
        return "handed-back"
    except PermanentJobError as exc:
        return _record_failure(ctx, f"{type(exc).__name__}: {exc}", started, retryable=False)
    except Exception as exc:
        log.exception("job %s attempt %s failed", job_id, ctx.attempt)
        return _record_failure(ctx, f"{type(exc).__name__}: {exc}", started, retryable=True)
    with session_scope() as session:
        if not complete(session, job_id, owner, result):
            return "lease-lost"
    ops.info("job.finished", job_id=job_id, kind=ctx.kind.value, attempt=ctx.attempt,
             duration_s=round(time.monotonic() - started, 3))
    return "succeeded"


def hand_back(session: Session, job_id: int, owner: str) -> bool:
    """Release our lease and queue the job again at once, this attempt uncounted."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status == JobStatus.running)
        .values(status=JobStatus.queued, attempts=Job.attempts - 1, lease_owner=None,
                lease_expires_at=None, dispatched_at=None, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    _dispatch_after_commit(session, job_id)
    return True


def _record_failure(
    ctx: JobContext, error: str, started: float, *, retryable: bool
) -> RunOutcome:
    with session_scope() as session:
        status = fail(session, ctx.job_id, ctx.owner, error, retryable=retryable)
    if status is None:
        return "lease-lost"
    ops.warning("job.failed", job_id=ctx.job_id, kind=ctx.kind.value, attempt=ctx.attempt,
                duration_s=round(time.monotonic() - started, 3), error=error[:500],
                retrying=status == JobStatus.retrying)
    return "retrying" if status == JobStatus.retrying else "failed"


def active_jobs(session: Session, kind: JobKind, key_prefix: str) -> list[Job]:
    """Jobs of ``kind`` not yet finished whose key starts with ``key_prefix``."""
    return list(
        session.scalars(
            select(Job).where(
                Job.kind == kind, Job.status.in_(_ACTIVE), Job.key.startswith(key_prefix)
            )
        )
    )
