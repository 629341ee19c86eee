"""``tracelearn keys``: API keys, created once and stored hashed."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from app.auth import service as keys_service
from app.db import get_database
from app.errors import DomainError

keys_cli = typer.Typer(help="API keys: created once, stored hashed.", no_args_is_help=True)
console = Console()


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code=2)


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
def keys_list(tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None) -> None:
    """List keys (never their secrets)."""
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
