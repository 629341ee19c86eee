"""``tracelearn tenants``: a tenant's settings (the PII redaction mode), without an API key."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from app.auth.service import Principal, Scope
from app.db import get_database
from app.tenants import service as tenants_service
from app.tenants.schemas import TenantUpdate
from app.traces.redaction import RedactionMode

tenants_cli = typer.Typer(help="Tenant settings: the PII redaction mode.", no_args_is_help=True)
console = Console()


@tenants_cli.command("show")
def tenants_show(tenant: Annotated[str, typer.Option(help="The tenant.")]) -> None:
    """Print a tenant's settings."""
    with get_database().session() as session:
        out = tenants_service.get_tenant(session, tenant)
    console.print(f"tenant {out.name!r}: redaction_mode {out.redaction_mode.value}")


@tenants_cli.command("set")
def tenants_set(
    tenant: Annotated[str, typer.Option(help="The tenant.")],
    redaction_mode: Annotated[RedactionMode, typer.Option(
        help="mask ([EMAIL]), hash ([EMAIL:3fa2c1d4e5f6], stable per value) or off.")],
) -> None:
    """Change a tenant's settings (audited as actor `cli`)."""
    actor = Principal(key_id=0, tenant=tenant, scopes=frozenset({Scope.admin}), name="cli")
    with get_database().session() as session:
        out = tenants_service.update_tenant(session, actor, TenantUpdate(
            redaction_mode=redaction_mode))
    console.print(f"tenant {out.name!r}: redaction_mode {out.redaction_mode.value}")
