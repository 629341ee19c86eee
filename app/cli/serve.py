"""Serving commands: ``tracelearn api`` (production), ``tracelearn up`` (everything on the
embedded default in one process tree) and ``tracelearn settings``."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TextIO

import typer
import uvicorn

from app.cli.processes import EmbeddedWorkers, start_embedded_workers
from app.cli.progress import console, stage_progress
from app.cores import usable_cores
from app.install import model_build_reason, prepare
from app.main import create_app, create_served_app
from app.settings import Settings, get_settings
from workers.learner.allocator import AllocatorUnavailable, planned_allocator

serve_app = typer.Typer()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def local_api(settings: Settings) -> Iterator[str]:
    """The API on a free loopback port in a background thread; yields its base URL."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the API server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _graceful_hangup(server: uvicorn.Server) -> Callable[[int, FrameType | None], None]:
    """A HUP handler: the first HUP asks ``server`` to shut down as TERM does; the one uvicorn
    re-raises after its graceful shutdown (or a second from the operator) exits."""
    def on_hangup(signum: int, frame: FrameType | None) -> None:
        if server.should_exit:
            raise SystemExit(128 + signum)
        server.handle_exit(signum, frame)
    return on_hangup


class CannotStart(RuntimeError):
    """``up`` would collide with something already running; nothing was started."""


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _claim_data_dir(settings: Settings) -> TextIO:
    """An exclusive lock on the data directory, held for the life of the process: two ``up``s on
    one SQLite file and one broker file would fight over every job."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    handle = (settings.data_dir / "up.lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise CannotStart(f"{settings.data_dir} is in use by tracelearn up ({owner}); stop it "
                          "or point TRACELEARN_DATA_DIR elsewhere") from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


def run_embedded(settings: Settings, host: str, port: int) -> None:
    """`tracelearn up`: SQLite file, a broker that needs no server, the bundled tiny model, the
    workers and beat as child processes, API and dashboard on localhost."""
    if not _port_free(host, port):
        raise CannotStart(f"port {port} on {host} is already in use; stop what listens there or "
                          "pass --port")
    try:
        learner = planned_allocator(settings.learner_allocator)
    except AllocatorUnavailable as exc:
        raise CannotStart(str(exc)) from exc
    lock = _claim_data_dir(settings)
    build_reason = model_build_reason(settings)
    if build_reason is not None:
        console.print(f"building the bundled tiny model (first run only, a few minutes): "
                      f"{build_reason}", markup=False, highlight=False)
        with stage_progress("building the bundled model") as report:
            model_dir = prepare(settings, report)
    else:
        model_dir = prepare(settings)
    handle: EmbeddedWorkers | None = start_embedded_workers(
        settings, show_events=lambda line: console.print(line, markup=False, highlight=False)
    )
    url = f"http://{host}:{port}"
    console.print(f"""
[bold green]tracelearn is up[/bold green]
  data      {settings.data_dir.resolve()}  (SQLite + no-server broker)
  model     {model_dir}
  learner   {learner} malloc  (TRACELEARN_LEARNER_ALLOCATOR)
  API docs  {url}/docs
  dashboard {url}/dashboard
  metrics   {url}/metrics

Create a key (in another shell, same directory):
  tracelearn keys create --tenant demo --scopes ingest,read,admin
Then post traces:
  curl -s -X POST {url}/v1/policies -H "Authorization: Bearer $KEY" \\
       -H 'content-type: application/json' -d '{{"name": "clinical"}}'
  tracelearn demo --url {url} --key $KEY     # synthetic clinical traces, end to end
""")
    server = uvicorn.Server(uvicorn.Config(create_served_app(settings), host=host, port=port,
                                           log_level="warning", access_log=False))
    # uvicorn shuts down gracefully on TERM/INT and then re-raises the signal with the handler it
    # found installed; ours turns that into SystemExit, so the workers below are stopped (and
    # hand their jobs back) instead of being orphaned. uvicorn does not handle HUP: it is routed
    # into the same graceful path. Raised mid-loop, a SystemExit skips the server's shutdown and
    # leaves asyncio.run's teardown waiting on whatever tasks and threads were in flight.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _graceful_hangup(server))
    try:
        server.run()
        if not server.started:
            raise SystemExit(3)  # what uvicorn.run answers when the app failed to start
    finally:
        if handle is not None:
            handle.stop()
            console.print(f"tracelearn stopped: API and {len(handle.processes)} worker "
                          "processes down, jobs in hand back in the queue")
        lock.close()


MAX_DEFAULT_API_WORKERS = 4


def default_api_workers() -> int:
    """One API process per usable core, at most ``MAX_DEFAULT_API_WORKERS``.

    A request is mostly Python (parsing, validation, redaction) under one GIL per process, so
    processes beyond the cores only contend. The cap: each process holds its own pool of up to
    30 Postgres connections, and four fill ~120 at worst, around Postgres's default
    ``max_connections`` of 100 — past that, scale out (more hosts or pods behind the load
    balancer) or raise ``max_connections`` and pass ``--workers``."""
    return min(usable_cores(), MAX_DEFAULT_API_WORKERS)


@serve_app.command("api")
def api(
    host: str = "127.0.0.1",
    port: int = 8080,
    workers: int | None = typer.Option(
        None, min=1, help="API processes. Default: one per usable core (CPU affinity and "
        f"cgroup quota), at most {MAX_DEFAULT_API_WORKERS}; each process has its own pool of "
        "up to 30 database connections, its own group-commit writer and, where cores are left "
        "over, its own ingest helpers (TRACELEARN_INGEST_HELPER_PROCESSES)."),
) -> None:
    """Serve the HTTP API and dashboard (production: behind a proxy, several workers)."""
    processes = workers or default_api_workers()
    # uvicorn's processes build their settings from the environment: they learn how many of
    # them share the cores (the default number of ingest helpers follows) from there.
    os.environ["TRACELEARN_API_PROCESSES"] = str(processes)
    uvicorn.run("app.main:create_served_app", factory=True, host=host, port=port,
                workers=processes, log_level="warning", access_log=False)


@serve_app.command("up")
def up(host: str = "127.0.0.1", port: int = 8080) -> None:
    """Run everything on the embedded default (SQLite, bundled model, workers, API, dashboard).

    Migrations, the bundled tiny model, workers for every queue, beat, the API and the dashboard
    in one process tree; TERM/INT/HUP stop it all. The API is one process whatever the cores:
    SQLite takes one writer at a time, so more API processes would only queue on its lock; the
    cores go to the worker processes. For more, run Postgres and `tracelearn api`."""
    try:
        run_embedded(get_settings(), host, port)
    except CannotStart as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


@serve_app.command("settings")
def show_settings() -> None:
    """Print the effective settings (secrets masked)."""
    data = get_settings().model_dump(mode="json")
    for secret in ("session_secret", "pii_hash_secret"):
        if data.get(secret) is not None:
            data[secret] = "***"
    typer.echo(json.dumps(data, indent=2))
