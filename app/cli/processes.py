"""The child processes of ``tracelearn up``: Celery workers for every queue and beat, started with
the environment that makes them build the same ``Settings`` as the parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.settings import Settings
from workers.celery_app import get_celery
from workers.learner.allocator import learner_environment

ALL_QUEUES = "rollout,grade,train,eval,promote,maintenance"


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
    """The Celery worker's command line. A worker that takes the train queue runs one task at a
    time (solo pool, concurrency 1) whatever is asked: two runs in one process would share its
    memory and cores, and a solo worker hands its run back cleanly on shutdown."""
    if "train" in queues.split(","):
        pool, concurrency = "solo", 1
    return [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
        "--queues", queues, "--pool", pool, "--concurrency", str(concurrency),
        "--prefetch-multiplier", "1", "--hostname", f"{name}@%h", "--loglevel", loglevel,
        "--without-gossip", "--without-mingle",
    ]


def beat_argv(loglevel: str = "WARNING") -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "beat",
        "--scheduler", "workers.beat:DatabaseScheduler", "--loglevel", loglevel,
    ]


def spawn(
    argv: list[str], settings: Settings, log_path: Path | None = None, *, learner: bool = False
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with ``settings``; ``learner``: a process that trains, started with the
    learner's allocator (``workers.learner.allocator``)."""
    env = os.environ | settings_env(settings)
    if learner:
        env = learner_environment(env, settings.learner_allocator)
    out: Any = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


OPS_EVENTS = ("tick", "plan", "job.", "run.", "evaluation.done", "verdict", "promotion")
"""Prefixes of the operational events (``app.observability.ops``) that ``up`` shows."""
_NOISE = frozenset({"event", "timestamp", "level", "logger"})


def compact_event(line: str) -> str | None:
    """One log line as a short console line, or None when it is not an operational event."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    event = record.get("event") if isinstance(record, dict) else None
    if not isinstance(event, str) or not event.startswith(OPS_EVENTS):
        return None
    fields = " ".join(f"{k}={v}" for k, v in record.items()
                      if k not in _NOISE and v not in (None, [], {}, ""))
    return f"{str(record.get('timestamp', ''))[11:19]} {event:<16} {fields}"


class EventFollower(threading.Thread):
    """Follows the workers' log files from their current end and hands every operational event
    to ``show`` in compact form."""

    def __init__(self, log_dir: Path, show: Callable[[str], None]) -> None:
        super().__init__(name="ops-events", daemon=True)
        self.log_dir, self.show = log_dir, show
        self._stop = threading.Event()
        self._offsets = {p: p.stat().st_size for p in log_dir.glob("*.log")}

    def run(self) -> None:
        while not self._stop.wait(0.5):
            for path in sorted(self.log_dir.glob("*.log")):
                offset = self._offsets.get(path, 0)
                with path.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                # Only whole lines; a half-written one is read again next time.
                whole = chunk[: chunk.rfind(b"\n") + 1]
                self._offsets[path] = offset + len(whole)
                for raw in whole.decode("utf-8", "replace").splitlines():
                    line = compact_event(raw)
                    if line is not None:
                        self.show(line)

    def stop(self) -> None:
        self._stop.set()


@dataclass
class EmbeddedWorkers:
    """Handle on the child processes of ``tracelearn up``."""

    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    log_dir: Path | None = None
    follower: EventFollower | None = None

    def alive(self) -> dict[str, bool]:
        return {name: p.poll() is None for name, p in self.processes.items()}

    def stop(self, timeout: float = 15.0) -> None:
        # Warm shutdown first: a job in hand hands itself back (lease released, re-queued) at
        # its next check; whatever is still running after ``timeout`` is killed.
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
        if self.follower is not None:
            self.follower.stop()


def start_embedded_workers(
    settings: Settings, show_events: Callable[[str], None] | None = None
) -> EmbeddedWorkers:
    """Workers for every queue and beat (which also runs the reaper), as children of this process,
    on the broker from ``settings`` (the no-server SQLite broker by default). Logs go to
    ``<data_dir>/logs/``; with ``show_events`` their operational events are followed and shown
    compactly. Call ``handle.stop()`` on shutdown."""
    log_dir = settings.data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    # Create the broker's tables once here, so the children do not race to create them.
    with get_celery().connection_for_write() as conn:
        conn.ensure_connection(max_retries=3)
        _ = conn.default_channel
    handle = EmbeddedWorkers(log_dir=log_dir)
    # Training runs alone (solo pool) so a long run never starves rollouts and grading.
    handle.processes["train"] = spawn(
        worker_argv("train", name="embedded-train"), settings, log_dir / "worker-train.log",
        learner=True,
    )
    handle.processes["worker"] = spawn(
        worker_argv("rollout,grade,eval,promote,maintenance", pool="threads", concurrency=2,
                    name="embedded"),
        settings, log_dir / "worker.log",
    )
    handle.processes["beat"] = spawn(beat_argv(), settings, log_dir / "beat.log")
    if show_events is not None:
        handle.follower = EventFollower(log_dir, show_events)
        handle.follower.start()
    return handle
