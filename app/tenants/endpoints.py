from __future__ import annotations

from fastapi import APIRouter, Depends

from app.auth.service import Principal, Scope
from app.dependencies import SessionDep, require
from app.tenants import service
from app.tenants.schemas import TenantOut, TenantUpdate

router = APIRouter(prefix="/tenant", tags=["tenant"])


@router.get("", response_model=TenantOut)
def get_tenant(
    session: SessionDep,
    principal: Principal = Depends(require(Scope.read)),
) -> TenantOut:
    """The calling key's tenant and its settings."""
    return service.get_tenant(session, principal.tenant)


@router.patch("", response_model=TenantOut)
def update_tenant(
    session: SessionDep,
    body: TenantUpdate,
    principal: Principal = Depends(require(Scope.admin)),
) -> TenantOut:
    """Change the tenant's settings; applies to what is ingested from then on."""
    return service.update_tenant(session, principal, body)
