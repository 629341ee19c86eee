"""`tracelearn up`: the whole service in one process tree on the embedded default — SQLite file,
a broker that needs no server, the bundled tiny model, API and dashboard on localhost."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from app import migrate
from app.settings import Settings

console = Console(stderr=True)


def ensure_base_model(settings: Settings) -> Path:
    """The configured base model, or the bundled tiny model built (once, cached) on first use."""
    if settings.base_model_dir is not None:
        return settings.base_model_dir
    from workers.learner.bootstrap import bootstrap_model

    target = settings.models_dir / "tiny"
    if (target / "config.json").is_file():
        return target
    with bar("building the bundled tiny model (first run only)") as update:
        return bootstrap_model(out=target, progress=lambda done, total, loss: update(done, total))


@contextlib.contextmanager
def bar(description: str) -> Iterator[Callable[[int, int], None]]:
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=console,
    ) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


def prepare(settings: Settings) -> Path:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(settings.resolved_database_url)
    return ensure_base_model(settings)


def run(settings: Settings, host: str, port: int) -> None:
    import uvicorn

    from app.main import create_app

    model_dir = prepare(settings)
    handle: Any = None
    try:
        from workers.commands import start_embedded_workers

        handle = start_embedded_workers(settings)
    except ImportError:
        console.print("[yellow]background workers unavailable in this build[/yellow]")
    url = f"http://{host}:{port}"
    console.print(f"""
[bold green]tracelearn is up[/bold green]
  data      {settings.data_dir.resolve()}  (SQLite + no-server broker)
  model     {model_dir}
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
    try:
        uvicorn.run(create_app(settings), host=host, port=port, log_level="warning",
                    access_log=False)
    finally:
        if handle is not None:
            handle.stop()
