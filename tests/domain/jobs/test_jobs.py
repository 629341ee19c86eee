"""The job table: idempotent enqueue, outbox dispatch, leases, retries and the reaper."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta

import pytest
import redis
from sqlalchemy import select

from app.db import session_scope, utcnow
from app.jobs.service import (
    JobContext,
    LeaseLost,
    PermanentJobError,
    claim,
    complete,
    enqueue,
    fail,
    heartbeat,
    reap,
    replan_due_at,
    replans_exhausted,
    request_stop,
    run_job,
)
from app.models import Job, JobKind, JobStatus
from app.settings import Settings


def _key() -> str:
    return f"test:{uuid.uuid4().hex}"


def _job(job_id: int) -> Job:
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def _queued_messages(url: str, queue: str = "rollout") -> int:
    return int(redis.Redis.from_url(url).llen(queue))


def test_enqueue_same_key_twice_is_one_job(pg_settings: Settings) -> None:
    key = _key()
    with session_scope() as s:
        a = enqueue(s, JobKind.rollout, key, {"n": 1})
    with session_scope() as s:
        b = enqueue(s, JobKind.rollout, key, {"n": 2})
        assert s.scalar(select(Job.payload).where(Job.key == key)) == {"n": 1}
    assert a.id == b.id


def test_enqueue_dispatches_only_after_commit(pg_settings: Settings, redis_url: str) -> None:
    before = _queued_messages(redis_url)
    key = _key()
    with pytest.raises(RuntimeError), session_scope() as s:
        enqueue(s, JobKind.rollout, key, {})
        raise RuntimeError("rolled back")
    with session_scope() as s:
        assert s.scalar(select(Job).where(Job.key == key)) is None
    assert _queued_messages(redis_url) == before

    with session_scope() as s:
        job = enqueue(s, JobKind.rollout, key, {})
    assert _job(job.id).dispatched_at is not None
    assert _queued_messages(redis_url) == before + 1


def test_claim_is_exclusive_while_the_lease_lives(pg_settings: Settings) -> None:
    with session_scope() as s:
        job_id = enqueue(s, JobKind.grade, _key(), {}, dispatch=False).id
    with session_scope() as s:
        assert claim(s, job_id, "a", lease_s=30) is not None
    with session_scope() as s:
        assert claim(s, job_id, "b", lease_s=30) is None
        assert heartbeat(s, job_id, "a", lease_s=30)
        assert not heartbeat(s, job_id, "b", lease_s=30)


def test_expired_lease_can_be_taken_over_and_the_old_owner_cannot_finish(
    pg_settings: Settings,
) -> None:
    with session_scope() as s:
        job_id = enqueue(s, JobKind.grade, _key(), {}, dispatch=False).id
    with session_scope() as s:
        claim(s, job_id, "a", lease_s=0.2)
    time.sleep(0.4)
    with session_scope() as s:
        taken = claim(s, job_id, "b", lease_s=30)
        assert taken is not None and taken.attempts == 2
    with session_scope() as s:
        assert not heartbeat(s, job_id, "a", lease_s=30)
        assert not complete(s, job_id, "a", {"by": "a"})
        assert complete(s, job_id, "b", {"by": "b"})
    job = _job(job_id)
    assert job.status == JobStatus.succeeded and job.result == {"by": "b"}


def test_failures_retry_until_attempts_run_out(pg_settings: Settings) -> None:
    with session_scope() as s:
        job_id = enqueue(s, JobKind.grade, _key(), {}, max_attempts=2, dispatch=False).id
    with session_scope() as s:
        claim(s, job_id, "a", 30)
        assert fail(s, job_id, "a", "boom 1") == JobStatus.retrying
    job = _job(job_id)
    assert job.error == "boom 1" and job.lease_owner is None
    with session_scope() as s:
        claim(s, job_id, "b", 30)
        assert fail(s, job_id, "b", "boom 2") == JobStatus.failed
    with session_scope() as s:
        assert claim(s, job_id, "c", 30) is None
    assert _job(job_id).status == JobStatus.failed


def test_reaper_requeues_expired_leases_and_fails_exhausted_ones(
    pg_settings: Settings, redis_url: str
) -> None:
    with session_scope() as s:
        retry_id = enqueue(s, JobKind.rollout, _key(), {}, max_attempts=3, dispatch=False).id
        dead_id = enqueue(s, JobKind.rollout, _key(), {}, max_attempts=1, dispatch=False).id
    with session_scope() as s:
        claim(s, retry_id, "gone", lease_s=0.1)
        claim(s, dead_id, "gone", lease_s=0.1)
    time.sleep(0.3)
    before = _queued_messages(redis_url)
    result = reap()
    assert retry_id in result.requeued and dead_id in result.failed
    retried, dead = _job(retry_id), _job(dead_id)
    assert retried.status == JobStatus.retrying and retried.dispatched_at is not None
    assert dead.status == JobStatus.failed and "lease expired" in (dead.error or "")
    assert _queued_messages(redis_url) >= before + 1


def test_reaper_sends_rows_the_outbox_never_sent(pg_settings: Settings) -> None:
    with session_scope() as s:
        job = enqueue(s, JobKind.rollout, _key(), {}, dispatch=False)
        job.dispatched_at = None  # as if the process died between commit and send
    assert reap().redispatched >= 1
    assert _job(job.id).dispatched_at is not None


def test_run_job_records_success_and_skips_a_duplicate_delivery(pg_settings: Settings) -> None:
    with session_scope() as s:
        job_id = enqueue(s, JobKind.grade, _key(), {"x": 2}, dispatch=False).id
    calls: list[int] = []

    def handler(ctx: JobContext) -> dict[str, int]:
        calls.append(ctx.attempt)
        return {"double": ctx.payload["x"] * 2}

    assert run_job(job_id, handler) == "succeeded"
    assert run_job(job_id, handler) == "skipped"
    assert calls == [1] and _job(job_id).result == {"double": 4}


def test_run_job_renews_the_lease_of_a_long_handler(pg_settings: Settings) -> None:
    with session_scope() as s:
        job_id = enqueue(s, JobKind.grade, _key(), {}, dispatch=False).id

    def slow(ctx: JobContext) -> dict[str, str]:
        time.sleep(2.5)  # > the 1.5 s lease: only heartbeats keep it
        with session_scope() as s:
            assert claim(s, job_id, "intruder", 30) is None
        ctx.check()
        return {}

    assert run_job(job_id, slow, lease_s=1.5) == "succeeded"


def test_a_handler_that_lost_its_lease_writes_nothing(pg_settings: Settings) -> None:
    with session_scope() as s:
        job_id = enqueue(s, JobKind.grade, _key(), {}, dispatch=False).id

    def hijacked(ctx: JobContext) -> dict[str, str]:
        with session_scope() as s:
            job = s.get(Job, job_id)
            assert job is not None
            job.lease_expires_at = utcnow() - timedelta(seconds=1)
        with session_scope() as s:
            claim(s, job_id, "new-owner", 30)
        ctx.check()
        return {"written": "yes"}

    assert run_job(job_id, hijacked) == "lease-lost"
    job = _job(job_id)
    assert job.lease_owner == "new-owner" and job.result == {}


def test_permanent_errors_fail_at_once(pg_settings: Settings) -> None:
    with session_scope() as s:
        job_id = enqueue(s, JobKind.grade, _key(), {}, max_attempts=5, dispatch=False).id

    def broken(ctx: JobContext) -> dict[str, str]:
        raise PermanentJobError("the policy is gone")

    assert run_job(job_id, broken) == "failed"
    job = _job(job_id)
    assert job.status == JobStatus.failed and job.attempts == 1
    assert "policy is gone" in (job.error or "")


def test_lease_lost_is_raised_by_check(pg_settings: Settings) -> None:
    ctx = JobContext(10**9, JobKind.grade, {}, 1, "nobody", 5.0)
    with pytest.raises(LeaseLost):
        ctx.check()


# --- a key names the work, not its fate: failed jobs are planned again ---------------------------


def _fail_now(job_id: int, minutes_ago: float = 0.0) -> None:
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.status, job.error = JobStatus.failed, "boom"
        job.updated_at = utcnow() - timedelta(minutes=minutes_ago)


def test_a_failed_job_is_planned_again_after_its_backoff_up_to_the_cap(
    sqlite_settings: Settings,
) -> None:
    # Defaults: 3 re-plans, 60 s backoff doubling each time (60, 120, 240 s).
    key = _key()
    with session_scope() as s:
        job_id = enqueue(s, JobKind.eval, key, {}, dispatch=False).id
    _fail_now(job_id, minutes_ago=0.5)
    with session_scope() as s:  # 30 s < 60 s: not yet
        assert enqueue(s, JobKind.eval, key, {}, dispatch=False).status is JobStatus.failed
    for replan, waited in ((1, 1.01), (2, 2.01), (3, 4.01)):
        _fail_now(job_id, minutes_ago=waited)
        with session_scope() as s:
            job = enqueue(s, JobKind.eval, key, {}, dispatch=False)
            assert (job.status, job.attempts, job.replans) == (JobStatus.queued, 0, replan)
    _fail_now(job_id, minutes_ago=60)
    with session_scope() as s:  # the cap: its failure is final now
        job = enqueue(s, JobKind.eval, key, {}, dispatch=False)
        assert job.status is JobStatus.failed and job.replans == 3
        assert replans_exhausted(job) and replan_due_at(job) is None
    with session_scope() as s:  # a person asking re-plans at once, cap or not
        job = enqueue(s, JobKind.eval, key, {}, dispatch=False, replan_now=True)
        assert job.status is JobStatus.queued and job.replans == 4


def test_a_stopping_worker_hands_its_job_back_uncounted(
    pg_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.jobs.service as jobs

    monkeypatch.setattr(jobs, "_stopping", threading.Event())
    with session_scope() as s:
        job_id = enqueue(s, JobKind.grade, _key(), {}, dispatch=False).id
    before = _queued_messages(str(pg_settings.broker_url), "grade")
    done: list[int] = []

    def handler(ctx: JobContext) -> dict[str, int]:
        done.append(1)  # the first unit of work
        request_stop()  # TERM arrives
        ctx.check()  # the next unit of work would start here
        done.append(2)
        return {}

    assert run_job(job_id, handler) == "handed-back"
    assert done == [1]
    job = _job(job_id)
    assert (job.status, job.attempts, job.lease_owner) == (JobStatus.queued, 0, None)
    # …and is on the broker again at once, for whichever worker is still up.
    assert job.dispatched_at is not None
    assert _queued_messages(str(pg_settings.broker_url), "grade") == before + 1
