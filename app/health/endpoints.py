"""Liveness, readiness and Prometheus metrics: the only routes without an API key."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from kombu import Connection
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.orm import Session

from app.db import first_statement, get_database
from app.observability import REGISTRY
from app.settings import get_settings

router = APIRouter(tags=["health"])

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:  # nothing to wait for: no threadpool hop
    return {"status": "ok"}


def _check_database() -> str | None:
    try:
        with Session(get_database().engine) as session:
            # Retried once on a pooled connection that died with a database restart: the
            # question is whether the database answers now, not whether the pool knew it had
            # gone away.
            first_statement(session, lambda: session.execute(text("SELECT 1")))
    except Exception as exc:
        return type(exc).__name__
    return None


def _check_broker() -> str | None:
    try:
        with Connection(get_settings().resolved_broker_url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
    except Exception as exc:
        return type(exc).__name__
    return None


@router.get(
    "/readyz",
    summary="Database and broker are reachable",
    responses={503: {"description": "A dependency is down"}},
)
def readyz() -> JSONResponse:
    checks: dict[str, Any] = {"database": _check_database(), "broker": _check_broker()}
    ok = all(v is None for v in checks.values())
    body = {
        "status": "ok" if ok else "unavailable",
        "checks": {k: ("ok" if v is None else f"error: {v}") for k, v in checks.items()},
    }
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
