"""Command line for the pipeline, and the two entry points ``tracelearn up`` / ``demo`` use.

``pipeline_app`` (mounted at the top level of ``tracelearn``)::

    tracelearn worker --queues rollout,grade      a Celery worker (train: --queues train, solo)
    tracelearn beat                               the one scheduler (per-policy crontabs + reaper)
    tracelearn reaper [--once]                    re-queue jobs whose lease expired
    tracelearn regenerate --policy NAME [--wait]  enqueue (or run here) regeneration + grading
    tracelearn train --policy NAME [--no-wait]    start a run and follow it with a progress bar
    tracelearn tick --policy NAME                 one scheduler tick by hand (what cron calls)

``start_embedded_workers(settings)`` runs workers and beat as child processes on the no-server
broker; ``run_policy_pipeline(name)`` does regenerate → grade → one training run in this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.settings import Settings, get_settings

pipeline_app = typer.Typer(help="Rollout workers, scheduler and training runs.")
console = Console(stderr=True)

ALL_QUEUES = "rollout,grade,train,eval,promote,maintenance"
StageProgress = Callable[[str, int, int], None]
"""progress(stage, done, total): stage is "regenerate", "grade" or "train"."""


# --- child processes ---------------------------------------------------------------------------


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process build the same ``Settings``."""
    env: dict[str, str] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, Path):
            value = str(value.resolve())
        elif isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, dict | list):
            value = json.dumps(value)
        env[f"TRACELEARN_{name.upper()}"] = str(value)
    # Relative SQLite paths must not depend on the child's working directory.
    env["TRACELEARN_DATABASE_URL"] = settings.resolved_database_url
    env["TRACELEARN_BROKER_URL"] = settings.resolved_broker_url
    return env


def worker_argv(
    queues: str, *, pool: str = "solo", concurrency: int = 1, name: str = "worker",
    loglevel: str = "WARNING",
) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
        "--queues", queues, "--pool", pool, "--concurrency", str(concurrency),
        "--prefetch-multiplier", "1", "--hostname", f"{name}@%h", "--loglevel", loglevel,
        "--without-gossip", "--without-mingle",
    ]


def beat_argv(loglevel: str = "WARNING") -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "beat",
        "--scheduler", "workers.schedules:DatabaseScheduler", "--loglevel", loglevel,
    ]


def spawn(argv: list[str], settings: Settings, log_path: Path | None = None) -> subprocess.Popen[bytes]:
    env = os.environ | settings_env(settings)
    out: Any = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


@dataclass
class EmbeddedWorkers:
    """Handle on the child processes of ``tracelearn up``."""

    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    log_dir: Path | None = None

    def alive(self) -> dict[str, bool]:
        return {name: p.poll() is None for name, p in self.processes.items()}

    def stop(self, timeout: float = 15.0) -> None:
        # Warm shutdown first (Celery finishes or re-queues the task in hand), then kill.
        for p in self.processes.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.processes.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)


def start_embedded_workers(settings: Settings) -> EmbeddedWorkers:
    """Workers for every queue and beat (which also runs the reaper), as children of this process,
    on the broker from ``settings`` (the no-server SQLite broker by default). Logs go to
    ``<data_dir>/logs/``. Call ``handle.stop()`` on shutdown."""
    from workers.celery_app import get_celery

    log_dir = settings.data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    # Create the broker's tables once here, so the children do not race to create them.
    with get_celery().connection_for_write() as conn:
        conn.ensure_connection(max_retries=3)
        _ = conn.default_channel
    handle = EmbeddedWorkers(log_dir=log_dir)
    # Training runs alone (solo pool) so a long run never starves rollouts and grading.
    handle.processes["train"] = spawn(
        worker_argv("train", name="embedded-train"), settings, log_dir / "worker-train.log"
    )
    handle.processes["worker"] = spawn(
        worker_argv("rollout,grade,eval,promote,maintenance", pool="threads", concurrency=2,
                    name="embedded"),
        settings, log_dir / "worker.log",
    )
    handle.processes["beat"] = spawn(beat_argv(), settings, log_dir / "beat.log")
    return handle


# --- the synchronous pipeline (tracelearn demo) ---------------------------------------------------


@dataclass
class PipelineResult:
    policy: str
    traces: int = 0
    groups_created: int = 0
    groups_graded: int = 0
    groups_failed: int = 0
    trainable_groups: int = 0
    run_id: int | None = None
    run_status: str | None = None
    snapshot_id: int | None = None
    served_name: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def run_policy_pipeline(
    policy_name: str,
    *,
    progress: StageProgress | None = None,
    train: bool = True,
    overrides: dict[str, Any] | None = None,
    max_traces: int | None = None,
) -> PipelineResult:
    """Regenerate every pending trace of the policy from its serving snapshot, grade the groups,
    then train one run (OAPL by default: the policy's config, ``overrides`` on top) — all in this
    process, no broker needed. The candidate snapshot is returned, not evaluated."""
    from sqlalchemy import select

    from app.db import session_scope
    from app.errors import Conflict
    from app.models import Job, Policy, RunStatus, Snapshot, TrainingRun
    from workers.jobs.service import run_job
    from workers.rollouts.service import (
        PipelineOptions,
        grade_groups,
        pending_trace_ids,
        regenerate,
        serving_snapshot,
    )
    from workers.training.service import count_trainable_groups, execute_run, start_run

    report = progress or (lambda stage, done, total: None)
    out = PipelineResult(policy=policy_name)
    with session_scope() as session:
        policy = session.scalars(select(Policy).where(Policy.name == policy_name)).first()
        if policy is None:
            raise LookupError(f"no policy named {policy_name!r}")
        snapshot_id = serving_snapshot(session, policy).id
        trace_ids = pending_trace_ids(session, policy, snapshot_id, max_traces)
        step = PipelineOptions.for_policy(policy).traces_per_call
    out.traces = len(trace_ids)
    group_ids: list[int] = []
    report("regenerate", 0, len(trace_ids))
    for start in range(0, len(trace_ids), step):
        res = regenerate(trace_ids[start : start + step], snapshot_id, enqueue_grading=False)
        group_ids += res.groups_created
        report("regenerate", min(start + step, len(trace_ids)), len(trace_ids))
    out.groups_created = len(group_ids)
    report("grade", 0, len(group_ids))
    for i, gid in enumerate(group_ids, 1):
        summary = grade_groups([gid])
        out.groups_graded += summary.groups_graded
        out.groups_failed += summary.groups_failed
        report("grade", i, len(group_ids))
    if not train:
        return out
    with session_scope() as session:
        policy = session.scalars(select(Policy).where(Policy.name == policy_name)).one()
        out.trainable_groups = count_trainable_groups(session, policy)
        try:
            run = start_run(session, policy, trigger="demo", actor="system:demo",
                            overrides=overrides, dispatch=False)
        except Conflict as exc:
            out.error = exc.detail
            return out
        session.flush()
        run_id = run.id
        job_id = session.scalars(select(Job.id).where(Job.key == f"train:run={run_id}")).one()
    out.run_id = run_id
    report("train", 0, 1)

    def handler(ctx: Any) -> dict[str, Any]:
        run = execute_run(int(ctx.payload["run_id"]), check=ctx.check,
                          progress=lambda s, t, m: report("train", s, t), enqueue_eval=False)
        return {"run_id": run.id, "status": run.status.value}

    run_job(job_id, handler)  # records failures on the job and the run itself
    with session_scope() as session:
        row = session.get(TrainingRun, run_id)
        assert row is not None
        out.run_status = row.status.value
        out.error = row.error
        out.metrics = dict(row.metrics or {})
        if row.status == RunStatus.succeeded and row.output_snapshot_id is not None:
            snap = session.get(Snapshot, row.output_snapshot_id)
            assert snap is not None
            out.snapshot_id, out.served_name = snap.id, snap.served_name
    report("train", 1, 1)
    return out


# --- CLI -----------------------------------------------------------------------------------------


def _bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                    console=console)


def _stage_reporter(bar: Progress) -> StageProgress:
    """A ``progress(stage, done, total)`` that keeps one bar per stage."""
    tasks: dict[str, Any] = {}

    def report(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    return report


def _exec(argv: list[str]) -> None:
    settings = get_settings()
    os.execvpe(argv[0], argv, os.environ | settings_env(settings))


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
        pool, concurrency = "solo", 1
    _exec(worker_argv(queues, pool=pool, concurrency=concurrency, name=name, loglevel=loglevel))


@pipeline_app.command("beat")
def beat(loglevel: Annotated[str, typer.Option()] = "INFO") -> None:
    """Run the scheduler (exactly one per deployment): per-policy crontabs and the reaper."""
    _exec(beat_argv(loglevel))


@pipeline_app.command("reaper")
def reaper(
    once: Annotated[bool, typer.Option(help="Reap once and exit (cron).")] = False,
) -> None:
    """Re-queue jobs whose lease expired and re-send undispatched ones."""
    from app.db import session_scope
    from workers.jobs.service import reap
    from workers.training.service import fail_orphaned_runs

    interval = get_settings().reaper_interval_s
    while True:
        result = reap()
        with session_scope() as session:
            orphans = fail_orphaned_runs(session)
        console.print(f"requeued {result.requeued} failed {result.failed} "
                      f"sent {result.redispatched} orphaned runs {orphans}")
        if once:
            return
        time.sleep(interval)


@pipeline_app.command("regenerate")
def regenerate_cmd(
    policy: Annotated[str, typer.Option(help="Policy name.")],
    wait: Annotated[bool, typer.Option(help="Run here instead of enqueueing jobs.")] = False,
    limit: Annotated[int | None, typer.Option(help="At most this many traces.")] = None,
) -> None:
    """Regenerate and grade the policy's pending traces from its serving snapshot."""
    if wait:
        with _bar() as bar:
            result = run_policy_pipeline(policy, progress=_stage_reporter(bar), train=False,
                                         max_traces=limit)
        console.print(f"{result.groups_created} groups: {result.groups_graded} graded, "
                      f"{result.groups_failed} failed")
        return
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import Policy
    from workers.rollouts.service import plan_regeneration

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
    steps: Annotated[int | None, typer.Option(min=1)] = None,
    wait: Annotated[bool, typer.Option(help="Train here with a progress bar (--no-wait: "
                                            "enqueue for the train worker).")] = True,
) -> None:
    """Start a training run on the policy's graded groups."""
    from sqlalchemy import select

    from app.db import session_scope
    from app.errors import DomainError
    from app.models import Job, Policy
    from workers.jobs.service import run_job
    from workers.training.service import execute_run, start_run

    overrides: dict[str, Any] = {}
    if algorithm:
        overrides["algorithm"] = algorithm
    if steps:
        overrides["steps"] = steps
    try:
        with session_scope() as session:
            row = session.scalars(select(Policy).where(Policy.name == policy)).first()
            if row is None:
                raise typer.BadParameter(f"no policy named {policy!r}")
            run = start_run(session, row, trigger="cli", actor="cli", overrides=overrides,
                            dispatch=not wait)
            session.flush()
            run_id = run.id
            job_id = session.scalars(select(Job.id).where(Job.key == f"train:run={run_id}")).one()
    except DomainError as exc:
        console.print(f"[red]error:[/red] {exc.detail}")
        raise typer.Exit(2) from exc
    if not wait:
        console.print(f"training run {run_id} queued")
        return
    with _bar() as bar:
        task = bar.add_task(f"run {run_id}", total=None)

        def handler(ctx: Any) -> dict[str, Any]:
            r = execute_run(run_id, check=ctx.check,
                            progress=lambda s, t, m: bar.update(task, completed=s, total=t))
            return {"status": r.status.value}

        outcome = run_job(job_id, handler)
    from app.models import TrainingRun

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
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import Policy
    from workers.schedules import tick_policy

    with session_scope() as session:
        pid = session.scalars(select(Policy.id).where(Policy.name == policy)).first()
    if pid is None:
        console.print(f"[red]no policy named {policy!r}")
        raise typer.Exit(2)
    typer.echo(json.dumps(tick_policy(pid).as_dict(), indent=2))


@pipeline_app.command("demo")
def demo_cmd(
    url: Annotated[str | None, typer.Option(
        help="A running `tracelearn up` to post to (same directory, so the same database). "
             "Default: start the API in this process.")] = None,
    key: Annotated[str | None, typer.Option(
        help="Admin key for --url (default: a new key for tenant 'demo').")] = None,
    traces: Annotated[int, typer.Option(min=10, help="Synthetic clinical traces to post.")] = 300,
    group_size: Annotated[int, typer.Option(min=2, help="Completions per train trace (G).")] = 8,
    max_tokens: Annotated[int, typer.Option(min=8, help="Completion length cap.")] = 80,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic traces.")] = 0,
) -> None:
    """The whole loop on the embedded default: post synthetic clinical traces over HTTP,
    regenerate, grade, one OAPL update, evaluate against the champion, gate. Leaves the
    candidate awaiting approval (or rejected, with the reason) on the dashboard."""
    from workers.demo import run_demo

    with _bar() as bar:
        result = run_demo(get_settings(), _stage_reporter(bar), url=url, key=key,
                          n_traces=traces, group_size=group_size, max_tokens=max_tokens,
                          seed=seed)
    if result.error:
        console.print(f"[red]demo stopped:[/red] {result.error}")
        raise typer.Exit(1)
    table = Table("held-out metric", "champion (before)", "candidate (after)", "paired p")
    for metric, after in result.after.items():
        before = result.before.get(metric)
        p = result.p_values.get(metric)
        table.add_row(metric, "—" if before is None else f"{before:.3f}", f"{after:.3f}",
                      "—" if p is None else "<0.001" if p < 1e-3 else f"{p:.3g}")
    console.print(table)
    console.print(f"policy {result.policy}: {result.traces_posted} traces posted "
                  f"({result.heldout} held out), {result.groups} groups graded, "
                  f"training run {result.run_id}")
    console.print(f"candidate {result.served_name}: [bold]{result.status}[/bold]"
                  + (f" ({result.status_reason})" if result.status_reason else ""))
    console.print(f"review it at {result.dashboard_url}")
