"""The child processes of ``tracelearn up``: Celery workers for every queue and beat, started with
the environment that makes them build the same ``Settings`` as the parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.settings import Settings
from workers.celery_app import get_celery

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
