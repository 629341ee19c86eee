"""``tracelearn db``: the schema, through Alembic migrations only."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from app import migrate

db_cli = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
console = Console()


@db_cli.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Create or upgrade the schema."""
    migrate.upgrade(revision=revision)
    console.print(f"database at revision {revision}")


@db_cli.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="Target, e.g. base or -1")]) -> None:
    """Downgrade the schema to REVISION."""
    migrate.downgrade(revision=revision)


@db_cli.command("current")
def db_current() -> None:
    """Print the schema's current revision."""
    migrate.current()
