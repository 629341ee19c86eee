"""Schedules: crontabs from the database drive regeneration, the data trigger and evaluation."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from app.db import session_scope
from app.models import Job, JobKind, RunStatus, TrainingRun
from app.runs.pipeline import run_policy_pipeline
from app.schedules.service import tick_policy
from app.settings import Settings
from tests.support.pipeline import Proc, policy_row, seed_policy, vary_rewards, wait_until
from workers.beat import CronSchedule

VARIED_GRADER = {"kind": "regex", "outcome": "pfs_gt_180d", "pattern": "(e)"}


def test_cron_schedule_is_due_after_each_fire_time() -> None:
    every_5s = CronSchedule("* * * * * */5")
    last = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    every_5s.nowfun = lambda: last + timedelta(seconds=3)
    assert not every_5s.is_due(last).is_due
    assert every_5s.is_due(last).next == 2.0
    every_5s.nowfun = lambda: last + timedelta(seconds=6)
    due = every_5s.is_due(last)
    assert due.is_due and due.next == 4.0
    hourly = CronSchedule("0 * * * *")
    hourly.nowfun = lambda: last + timedelta(minutes=59)
    assert not hourly.is_due(last).is_due
    assert CronSchedule("0 * * * *") == hourly


def test_tick_trains_only_when_the_data_trigger_holds(
    pg_settings: Settings, model_dir: Path
) -> None:
    name, _ = seed_policy(pg_settings, model_dir, n_traces=3, group_size=4, max_tokens=16,
                          grader=VARIED_GRADER, training={"min_groups": 50})
    policy_id = policy_row(name).id
    first = tick_policy(policy_id)
    assert len(first.rollout_jobs) == 1 and first.training_run_id is None
    assert tick_policy(policy_id).rollout_jobs == []  # already covered by the queued job

    run_policy_pipeline(name, train=False)
    vary_rewards(name)
    starved = tick_policy(policy_id)
    assert starved.training_run_id is None and "< min_groups 50" in (starved.training_skipped or "")

    with session_scope() as s:
        policy = policy_row(name)
        s.add(policy)
        policy.training_config = {"min_groups": 1}
    fired = tick_policy(policy_id)
    assert fired.training_run_id is not None
    assert tick_policy(policy_id).training_skipped == "a run is in progress"


def test_beat_fires_a_training_run_on_a_short_crontab(
    pg_settings: Settings,
    model_dir: Path,
    start_worker: Callable[..., Proc],
    start_beat: Callable[[Settings], Proc],
) -> None:
    name, _ = seed_policy(pg_settings, model_dir, n_traces=2, group_size=4, max_tokens=16,
                          grader=VARIED_GRADER, training={"min_groups": 1},
                          schedule="* * * * * */2")
    run_policy_pipeline(name, train=False)
    vary_rewards(name)
    policy_id = policy_row(name).id
    worker = start_worker(pg_settings, "maintenance", name="ticker")
    beat = start_beat(pg_settings)

    def scheduled_run() -> TrainingRun | None:
        with session_scope() as s:
            return s.scalars(select(TrainingRun).where(TrainingRun.policy_id == policy_id)).first()

    try:
        run = wait_until(scheduled_run, timeout=120, every=0.5)
    except TimeoutError as exc:
        logs = f"beat:\n{beat.text()[-3000:]}\nworker:\n{worker.text()[-3000:]}"
        raise AssertionError(logs) from exc
    assert run.trigger == "schedule" and run.status == RunStatus.queued

    def train_job() -> Job | None:
        # The run row commits first; the worker stamps dispatched_at just after sending.
        with session_scope() as s:
            job = s.scalars(select(Job).where(Job.key == f"train:run={run.id}")).one()
            return job if job.dispatched_at is not None else None

    job = wait_until(train_job, timeout=30, every=0.2)
    assert job.kind == JobKind.train
