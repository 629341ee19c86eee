"""create_app(): routers, middleware, error handlers and the job sender — nothing else."""

from __future__ import annotations

import gc
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.types import ASGIApp

from app.apidocs import install_docs
from app.dashboard.routes import install_dashboard
from app.feedback.endpoints import router as feedback_router
from app.health.endpoints import router as health_router
from app.jobs.service import register_sender
from app.limits import BodyLimitMiddleware, SecurityHeadersMiddleware
from app.observability import MetricsMiddleware, configure_logging, file_routes_under
from app.policies.endpoints import router as policies_router
from app.problems import install_error_handlers
from app.proxy.endpoints import router as proxy_router
from app.receivers.langfuse.endpoints import router as langfuse_router
from app.receivers.otlp.endpoints import router as otlp_router
from app.runs.endpoints import router as runs_router
from app.settings import Settings, get_settings
from app.snapshots.endpoints import router as snapshots_router
from app.tenants.endpoints import router as tenant_router
from app.traces import service as trace_service
from app.traces.endpoints import CachedSingleTraceIngest
from app.traces.endpoints import router as traces_router
from workers.celery_app import send_job

API_ROUTERS = [traces_router, feedback_router, policies_router, snapshots_router,
               runs_router, proxy_router, tenant_router]


class TracelearnAPI(FastAPI):
    """The application, with the cached single-trace path (``CachedSingleTraceIngest``) in
    front of its whole middleware stack, the framework's layers included: it answers the
    hottest request without the eight layers every other request goes through, and does itself
    what they would do for it (body checks, security headers, request metrics) under the same
    ``settings`` the body limit middleware was built with."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.body_limits = (settings.max_body_bytes, settings.max_json_depth)

    def build_middleware_stack(self) -> ASGIApp:
        max_bytes, max_depth = self.body_limits
        return CachedSingleTraceIngest(
            super().build_middleware_stack(), max_bytes=max_bytes, max_depth=max_depth,
            route=next(route for route in traces_router.routes
                       if isinstance(route, APIRoute) and "POST" in (route.methods or ())))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_json)
    # Jobs enqueued by requests (runs, evaluations, promotions) reach the broker this way.
    register_sender(send_job)
    app = TracelearnAPI(
        settings,
        docs_url=None,  # served from local assets by install_docs
        redoc_url=None,
        title="tracelearn",
        version="0.1.0",
        description="Ingest production traces, regenerate and grade groups, train OAPL adapters, "
        "evaluate, approve and hot-load them into serving.",
    )
    install_error_handlers(app)
    app.include_router(health_router)
    for router in API_ROUTERS:
        app.include_router(router, prefix="/v1")
        file_routes_under("/v1", router.routes)
    app.include_router(langfuse_router)
    app.include_router(otlp_router)
    install_docs(app)
    install_dashboard(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       max_depth=settings.max_json_depth)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(MetricsMiddleware)
    return app


def create_served_app(settings: Settings | None = None) -> FastAPI:
    """``create_app`` for a server process that lives on (``tracelearn api``, ``up``).

    Everything built so far — modules, schemas, routes, the ORM's registry: some 170 k objects
    — is moved out of the cyclic collector's reach (``gc.freeze``): they live as long as the
    process, and a full collection that walked them stalled every request of the process for
    ~90 ms whenever a 1,000-trace batch filled the young generations. Not in ``create_app``:
    a test process builds many apps and drops them, and frozen cycles are never collected."""
    app = create_app(settings)
    gc.freeze()
    trace_service.start_helpers(settings or get_settings())
    return app
