"""The `tracelearn` command line: thin wrappers over the services."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from app import migrate
from app.auth import service as keys_service
from app.db import get_database
from app.errors import DomainError
from app.settings import get_settings
from workers.commands import pipeline_app
from workers.learner.commands import model_app, train_app

cli = typer.Typer(help="tracelearn: better LoRA adapters from production traces.",
                  no_args_is_help=True)
db_cli = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
keys_cli = typer.Typer(help="API keys: created once, stored hashed.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")
cli.add_typer(keys_cli, name="keys")
cli.add_typer(model_app, name="model")
cli.add_typer(train_app, name="train-offline")
cli.add_typer(pipeline_app)
console = Console()


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code=2)


@db_cli.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Create or upgrade the schema."""
    migrate.upgrade(revision=revision)
    console.print(f"database at revision {revision}")


@db_cli.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="Target, e.g. base or -1")]) -> None:
    migrate.downgrade(revision=revision)


@db_cli.command("current")
def db_current() -> None:
    migrate.current()


@keys_cli.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant the key belongs to.")],
    scopes: Annotated[str, typer.Option(help="Comma-separated: ingest,read,admin.")] = "ingest,read",
    name: Annotated[str, typer.Option(help="A label to recognise the key by.")] = "",
) -> None:
    """Create a key and print it once; only its hash is stored."""
    try:
        with get_database().session() as session:
            created = keys_service.create_key(session, tenant, scopes, name)
    except DomainError as exc:
        _fail(exc.detail)
        return
    console.print(f"key id {created.id} for tenant {created.tenant!r}, scopes {created.scopes}")
    console.print("store it now, it is not shown again:")
    typer.echo(created.secret)


@keys_cli.command("list")
def keys_list(tenant: Annotated[str | None, typer.Option()] = None) -> None:
    table = Table("id", "tenant", "name", "scopes", "created", "revoked")
    with get_database().session() as session:
        for k in keys_service.list_keys(session, tenant):
            table.add_row(str(k.id), k.tenant, k.name, ",".join(k.scopes),
                          k.created_at.isoformat(timespec="seconds"),
                          k.revoked_at.isoformat(timespec="seconds") if k.revoked_at else "")
    console.print(table)


@keys_cli.command("revoke")
def keys_revoke(key_id: int) -> None:
    """Revoke a key; it stops working at once."""
    try:
        with get_database().session() as session:
            keys_service.revoke_key(session, key_id)
    except DomainError as exc:
        _fail(exc.detail)
    console.print(f"revoked key {key_id}")


@cli.command("api")
def api(host: str = "127.0.0.1", port: int = 8080, workers: int = 1) -> None:
    """Serve the HTTP API and dashboard (production: behind a proxy, several workers)."""
    import uvicorn

    uvicorn.run("app.main:create_app", factory=True, host=host, port=port, workers=workers,
                log_level="warning", access_log=False)


@cli.command("up")
def up(host: str = "127.0.0.1", port: int = 8080) -> None:
    """Run everything on the embedded default: migrations, bundled model, workers, API and
    dashboard in one process tree."""
    from app import embedded

    embedded.run(get_settings(), host, port)


@cli.command("settings")
def show_settings() -> None:
    """Print the effective settings (secrets masked)."""
    data = get_settings().model_dump(mode="json")
    data["session_secret"] = "***"
    typer.echo(json.dumps(data, indent=2))


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
