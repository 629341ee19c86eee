"""``tracelearn import`` and ``tracelearn export`` (mounted at the top level): traces in and out
in other tools' formats, a thin shell over ``app.transfer.service``::

    tracelearn import FILE --format openai-jsonl|langfuse|otlp-json --tenant T [--policy P]
    tracelearn export FILE --format openai-jsonl|parquet --tenant T [--policy P] [--bare]

Both print a JSON summary on stdout (the progress bar is on stderr).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from app.cli.progress import console, stage_progress
from app.db import get_database
from app.settings import get_settings
from app.transfer.service import ExportFormat, ImportFormat, export_file, import_file, operator

transfer_app = typer.Typer(help="Import and export traces.")


@transfer_app.command("import")
def import_command(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    format: Annotated[ImportFormat, typer.Option("--format", help="What the file holds.")],
    tenant: Annotated[str, typer.Option(help="The tenant the traces belong to.")],
    policy: Annotated[str | None, typer.Option(
        help="OpenAI JSONL: the policy to import into (default: the one each line of "
        "our own export names).")] = None,
    batch_size: Annotated[int, typer.Option(help="Records per committed batch.")] = 500,
) -> None:
    """Import a file through the same path as HTTP ingest; running it again adds nothing."""
    stage = f"importing {file.name}"
    with stage_progress() as progress:
        report = import_file(get_database(), operator(tenant, "import"), file, format,
                             get_settings(), policy=policy, batch_size=batch_size,
                             progress=lambda done, total: progress(stage, done, total))
    for problem in report.problems:
        console.print(f"[yellow]{problem}[/yellow]", markup=False)
    typer.echo(json.dumps({"records": report.records, "created": report.created,
                           "already_stored": report.already_stored, "skipped": report.skipped,
                           "rejected": report.rejected}))
    if report.rejected:
        raise typer.Exit(code=1)


@transfer_app.command("export")
def export_command(
    file: Annotated[Path, typer.Argument(dir_okay=False, writable=True)],
    format: Annotated[ExportFormat, typer.Option("--format", help="The file's format.")],
    tenant: Annotated[str, typer.Option(help="Whose traces.")],
    policy: Annotated[str | None, typer.Option(help="Only this policy's traces.")] = None,
    bare: Annotated[bool, typer.Option(
        help="OpenAI JSONL with the chat keys only (what OpenAI's fine-tuning upload "
        "accepts), without outcomes and rollout groups.")] = False,
) -> None:
    """Export traces with their outcomes and graded rollout groups (rewards included)."""
    stage = f"exporting to {file.name}"
    with stage_progress() as progress:
        written = export_file(get_database(), tenant, file, format, policy=policy, bare=bare,
                              progress=lambda done, total: progress(stage, done, total))
    typer.echo(json.dumps({"traces": written, "file": str(file)}))
