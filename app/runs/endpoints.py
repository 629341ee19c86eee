from __future__ import annotations

from fastapi import APIRouter, Depends, Query, status

from app.auth.service import Principal, Scope
from app.dependencies import SessionDep, require
from app.runs import service
from app.runs.schemas import RunCreate, RunOut, RunPage

router = APIRouter(tags=["training runs"])


@router.post(
    "/policies/{name}/training-runs",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=RunOut,
    summary="Start a training run now",
    description="Creates a queued run on the policy's graded groups and its train job. 409 when "
    "a run is already in progress or there is nothing to train on; 422 on a bad config.",
    responses={409: {"description": "Run in progress, or no trainable groups"},
               422: {"description": "Invalid trainer config"}},
)
def start_run(
    session: SessionDep,
    name: str,
    body: RunCreate | None = None,
    principal: Principal = Depends(require(Scope.admin)),
) -> RunOut:
    return service.start_run(session, principal, name, body or RunCreate())


@router.get("/training-runs/{run_id}", response_model=RunOut, summary="A run's status")
def get_run(
    session: SessionDep,
    run_id: int,
    principal: Principal = Depends(require(Scope.read)),
) -> RunOut:
    return service.get_run(session, principal, run_id)


@router.get("/training-runs", response_model=RunPage, summary="Recent runs, newest first")
def list_runs(
    session: SessionDep,
    policy: str | None = Query(default=None, description="Only this policy's runs."),
    limit: int = Query(default=50, ge=1, le=500),
    principal: Principal = Depends(require(Scope.read)),
) -> RunPage:
    return RunPage(items=service.list_runs(session, principal, policy, limit))
