"""Workers, scheduler and training runs from the command line (mounted at the top level)::

    tracelearn worker --queues rollout,grade      a Celery worker (train: --queues train, solo)
    tracelearn beat                               the one scheduler (per-policy crontabs + reaper)
    tracelearn reaper [--once]                    re-queue jobs whose lease expired
    tracelearn regenerate --policy NAME [--wait]  enqueue (or run here) regeneration + grading
    tracelearn train --policy NAME [--no-wait]    start a run and follow it with a progress bar
                                                  (trained here: restarted on the learner's
                                                  allocator first)
    tracelearn tick --policy NAME                 one scheduler tick by hand (what cron calls)
    tracelearn retention [--limit N]              one retention pass (beat runs it hourly)
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Annotated, Any

import typer
from sqlalchemy import select

from app.cli.processes import ALL_QUEUES, beat_argv, settings_env, worker_argv
from app.cli.progress import console, stage_progress
from app.db import session_scope
from app.errors import DomainError
from app.jobs.service import run_job
from app.models import Policy, TrainingRun
from app.retention import retention_pass
from app.rollouts.service import plan_regeneration
from app.runs.pipeline import run_policy_pipeline
from app.runs.training import execute_run, start_run, train_job
from app.schedules.service import maintenance, tick_policy
from app.settings import get_settings
from workers.learner.allocator import (
    AllocatorUnavailable,
    allocator_in_use,
    learner_environment,
    planned_allocator,
)
from workers.learner.commands import train_offline

pipeline_app = typer.Typer(help="Rollout workers, scheduler and training runs.")


def _exec(argv: list[str], *, learner: bool = False) -> None:
    """Replace this process with ``argv``; ``learner``: it may train, so it starts with the
    learner's allocator (``workers.learner.allocator``: it cannot change after start)."""
    env = os.environ | settings_env(get_settings())
    os.execvpe(argv[0], argv, _learner_env(env) if learner else env)


def _learner_env(base: Mapping[str, str]) -> dict[str, str]:
    """``base`` set up for the learner's allocator; exit 2 with the reason when it cannot be."""
    choice = get_settings().learner_allocator
    try:
        return learner_environment(base, choice)
    except AllocatorUnavailable as exc:
        console.print(f"[red]{exc}")
        raise typer.Exit(2) from exc


_ON_LEARNER_ALLOCATOR = "TRACELEARN_ON_LEARNER_ALLOCATOR"
"""Set in the environment of a command restarted on the learner's allocator: never twice (a
library that failed to preload would otherwise restart it forever)."""


def _restart_on_learner_allocator() -> None:
    """Restart this command on the learner's allocator when it is to train here, in this
    process: the allocator is chosen at process start (``workers.learner.allocator``)."""
    if allocator_in_use() == "jemalloc" or os.environ.get(_ON_LEARNER_ALLOCATOR):
        return
    env = _learner_env(os.environ)
    if planned_allocator(get_settings().learner_allocator) == "system":
        return  # ``system``, or ``auto`` without the library: nothing to change
    env[_ON_LEARNER_ALLOCATOR] = "1"
    # orig_argv: the interpreter's own command line (``python -m app.cli …`` or the console
    # script's path and its arguments), run again by this interpreter.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


@functools.wraps(train_offline)
def train_offline_on_learner_allocator(*args: Any, **kwargs: Any) -> None:
    """``tracelearn train-offline``: the engine's command, in a process on the learner's
    allocator (each torchrun rank restarts itself once; the pid, which torchrun watches, stays)."""
    _restart_on_learner_allocator()
    train_offline(*args, **kwargs)


@pipeline_app.command("worker")
def worker(
    queues: Annotated[str, typer.Option(help=f"Comma-separated, of: {ALL_QUEUES}.")] = ALL_QUEUES,
    pool: Annotated[str, typer.Option(help="solo | threads | prefork")] = "solo",
    concurrency: Annotated[int, typer.Option(min=1)] = 1,
    name: Annotated[str, typer.Option(help="Worker name (name@host).")] = "worker",
    loglevel: Annotated[str, typer.Option()] = "INFO",
) -> None:
    """Run a Celery worker. The train queue wants its own worker: --queues train (solo, 1)."""
    if "train" in queues.split(",") and (pool != "solo" or concurrency != 1):
        console.print("[yellow]the train queue runs one task at a time: forcing --pool solo -c 1")
    _exec(worker_argv(queues, pool=pool, concurrency=concurrency, name=name, loglevel=loglevel),
          learner="train" in queues.split(","))


@pipeline_app.command("beat")
def beat(loglevel: Annotated[str, typer.Option()] = "INFO") -> None:
    """Run the scheduler (exactly one per deployment): per-policy crontabs and the reaper."""
    _exec(beat_argv(loglevel))


@pipeline_app.command("reaper")
def reaper(
    once: Annotated[bool, typer.Option(help="Reap once and exit (cron).")] = False,
) -> None:
    """Re-queue jobs whose lease expired and re-send undispatched ones."""
    interval = get_settings().reaper_interval_s
    while True:
        result = maintenance()
        console.print(f"requeued {result.requeued} failed {result.failed} "
                      f"sent {result.redispatched} orphaned runs {result.orphaned_runs}")
        if once:
            return
        time.sleep(interval)


@pipeline_app.command("retention")
def retention_cmd(
    limit: Annotated[int | None, typer.Option(help="Delete at most this many traces.")] = None,
) -> None:
    """Delete traces older than `retention_days` (with their rollouts; audited) and receiver
    pieces older than `staging_retention_hours`; what beat runs every `retention_interval_s`."""
    typer.echo(json.dumps(retention_pass(get_settings(), limit=limit).as_dict(), indent=2))


@pipeline_app.command("regenerate")
def regenerate_cmd(
    policy: Annotated[str, typer.Option(help="Policy name.")],
    wait: Annotated[bool, typer.Option(help="Run here instead of enqueueing jobs.")] = False,
    limit: Annotated[int | None, typer.Option(help="At most this many traces.")] = None,
) -> None:
    """Regenerate and grade the policy's pending traces from its serving snapshot."""
    if wait:
        with stage_progress() as report:
            result = run_policy_pipeline(policy, progress=report, train=False, max_traces=limit)
        console.print(f"{result.groups_created} groups: {result.groups_graded} graded, "
                      f"{result.groups_failed} failed")
        return
    with session_scope() as session:
        row = session.scalars(select(Policy).where(Policy.name == policy)).first()
        if row is None:
            console.print(f"[red]no policy named {policy!r}")
            raise typer.Exit(2)
        jobs = plan_regeneration(session, row, limit=limit)
        ids = [j.id for j in jobs]
    console.print(f"enqueued {len(ids)} rollout jobs: {ids}")


@pipeline_app.command("train")
def train_cmd(
    policy: Annotated[str, typer.Option(help="Policy name.")],
    algorithm: Annotated[str | None, typer.Option(help="oapl | grpo")] = None,
    epochs: Annotated[int | None, typer.Option(
        min=1, help="Passes over the graded groups (default: the policy's).")] = None,
    wait: Annotated[bool, typer.Option(help="Train here with a progress bar (--no-wait: "
                                            "enqueue for the train worker).")] = True,
) -> None:
    """Start a training run on the policy's graded groups."""
    if wait:
        _restart_on_learner_allocator()
    overrides: dict[str, Any] = {}
    if algorithm:
        overrides["algorithm"] = algorithm
    if epochs:
        overrides["epochs"] = epochs
    try:
        with session_scope() as session:
            row = session.scalars(select(Policy).where(Policy.name == policy)).first()
            if row is None:
                raise typer.BadParameter(f"no policy named {policy!r}")
            run = start_run(session, row, trigger="cli", actor="cli", overrides=overrides,
                            dispatch=not wait)
            session.flush()
            run_id = run.id
            job = train_job(session, run_id)
            assert job is not None
            job_id = job.id
    except DomainError as exc:
        console.print(f"[red]error:[/red] {exc.detail}")
        raise typer.Exit(2) from exc
    if not wait:
        console.print(f"training run {run_id} queued")
        return
    with stage_progress() as report:

        def handler(ctx: Any) -> dict[str, Any]:
            r = execute_run(run_id, check=ctx.check,
                            progress=lambda s, t, m: report(f"run {run_id}", s, t))
            return {"status": r.status.value}

        outcome = run_job(job_id, handler)
    with session_scope() as session:
        r = session.get(TrainingRun, run_id)
        assert r is not None
        console.print(f"run {run_id}: {r.status.value} ({outcome})"
                      + (f" error: {r.error}" if r.error else ""))
        if r.status.value != "succeeded":
            raise typer.Exit(1)


@pipeline_app.command("tick")
def tick_cmd(policy: Annotated[str, typer.Option(help="Policy name.")]) -> None:
    """One scheduler tick for a policy: regenerate, train if the data trigger holds, evaluate."""
    with session_scope() as session:
        pid = session.scalars(select(Policy.id).where(Policy.name == policy)).first()
    if pid is None:
        console.print(f"[red]no policy named {policy!r}")
        raise typer.Exit(2)
    typer.echo(json.dumps(tick_policy(pid).as_dict(), indent=2))
