from __future__ import annotations

from fastapi import APIRouter, Depends, status

from app.auth.service import Principal, Scope
from app.dependencies import SessionDep, require
from app.policies import service
from app.policies.schemas import PolicyCreate, PolicyOut, PolicyUpdate

router = APIRouter(prefix="/policies", tags=["policies"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=PolicyOut)
def create_policy(
    session: SessionDep,
    body: PolicyCreate,
    principal: Principal = Depends(require(Scope.admin)),
) -> PolicyOut:
    return service.to_out(service.create_policy(session, principal, body))


@router.get("", response_model=list[PolicyOut])
def list_policies(
    session: SessionDep,
    principal: Principal = Depends(require(Scope.read)),
) -> list[PolicyOut]:
    return [service.to_out(p) for p in service.list_policies(session, principal.tenant)]


@router.get("/{name}", response_model=PolicyOut)
def get_policy(
    session: SessionDep,
    name: str,
    principal: Principal = Depends(require(Scope.read)),
) -> PolicyOut:
    return service.to_out(service.get_policy(session, principal.tenant, name))


@router.patch("/{name}", response_model=PolicyOut)
def update_policy(
    session: SessionDep,
    name: str,
    body: PolicyUpdate,
    principal: Principal = Depends(require(Scope.admin)),
) -> PolicyOut:
    return service.to_out(service.update_policy(session, principal, name, body))
