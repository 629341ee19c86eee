"""`POST /otlp/v1/traces` and Langfuse's `POST /api/public/otel/v1/traces`: point an OTLP/HTTP
exporter's traces endpoint here (and its logs endpoint at `/otlp/v1/logs`, for instrumentations
that export a call's messages as log events).

Auth as the other receivers: `Authorization: Bearer <API key>` (the exporter's `headers`
setting), or Basic with the Langfuse key pair; the key needs the `ingest` scope. The answer is an
ExportTraceServiceResponse in the request's encoding (protobuf or JSON), with
`partial_success` counting the spans that were not stored and why. A refused request (4xx,
5xx) answers a ``google.rpc.Status`` in the request's encoding, as OTLP/HTTP specifies, so an
exporter can log why: not problem+json, which exporters cannot read.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.auth.service import Principal
from app.dependencies import SessionDep, receiver_principal
from app.errors import DomainError
from app.receivers.otlp import service
from app.settings import get_settings

OTLP_PATHS = ("/otlp/", "/api/public/otel/")
"""Where the OTLP receivers live (their refusals are ``google.rpc.Status``, not problem+json)."""


class OtlpRoute(APIRoute):
    """Turns the errors raised while serving an OTLP route (auth, rate limit, undecodable body,
    database down) into OTLP/HTTP's error answer: the HTTP status, and a ``google.rpc.Status``
    encoded like the request (``Retry-After`` kept on 429 and 503, which exporters retry)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            kind = service.error_media_type(request.headers.get("content-type", ""))
            try:
                return await handler(request)
            except DomainError as exc:
                headers = ({"Retry-After": str(exc.extra["retry_after"])}
                           if "retry_after" in exc.extra else None)
                return _status(exc.status, exc.detail, kind, headers)
            except RequestValidationError:
                return _status(400, "the request did not validate", kind)
            except StarletteHTTPException as exc:
                return _status(exc.status_code, str(exc.detail), kind,
                               dict(exc.headers) if exc.headers else None)
            except OperationalError:
                return _status(503, "the database is unavailable; retry later", kind,
                               {"Retry-After": "5"})
            except DBAPIError as exc:
                if not exc.connection_invalidated:
                    raise
                return _status(503, "the database connection was lost; retry later", kind,
                               {"Retry-After": "5"})

        return route


def _status(http_status: int, message: str, kind: str,
            headers: dict[str, str] | None = None) -> Response:
    return Response(service.error_status(http_status, message, kind), status_code=http_status,
                    media_type=kind, headers=headers)


router = APIRouter(tags=["receivers"], route_class=OtlpRoute)

_DESCRIPTION = (
    "An OTLP/HTTP ExportTraceServiceRequest, `application/x-protobuf` or `application/json` "
    "(optionally gzip). GenAI spans (semantic conventions, old and new attribute shapes) become "
    "traces (`external_id` = `otel-<trace id>-<span id>`), `gen_ai.evaluation.result` events "
    "become outcomes; other spans are acknowledged and skipped. The policy is the "
    "`tracelearn.policy` attribute (span or resource) or the model's name."
)


async def raw_body(request: Request) -> bytes:
    return await request.body()


@router.post("/otlp/v1/traces", summary="OTLP/HTTP traces: GenAI spans become traces",
             description=_DESCRIPTION, response_class=Response)
@router.post("/api/public/otel/v1/traces", summary="Langfuse's OTel endpoint (same receiver)",
             description=_DESCRIPTION, response_class=Response)
def export_traces(
    request: Request,
    session: SessionDep,
    body: bytes = Depends(raw_body),
    principal: Principal = Depends(receiver_principal),
) -> Response:
    return _receive(request, session, body, principal, service.TRACES)


_LOGS_DESCRIPTION = (
    "An OTLP/HTTP ExportLogsServiceRequest. GenAI events exported as log records "
    "(`gen_ai.*.message`, `gen_ai.choice`, `gen_ai.evaluation.result`) join the span they name "
    "(trace and span id), whichever arrives first; other log records are acknowledged and "
    "skipped."
)


@router.post("/otlp/v1/logs", summary="OTLP/HTTP logs: GenAI events join their span's trace",
             description=_LOGS_DESCRIPTION, response_class=Response)
@router.post("/api/public/otel/v1/logs", summary="Langfuse's OTel logs path (same receiver)",
             description=_LOGS_DESCRIPTION, response_class=Response)
def export_logs(
    request: Request,
    session: SessionDep,
    body: bytes = Depends(raw_body),
    principal: Principal = Depends(receiver_principal),
) -> Response:
    return _receive(request, session, body, principal, service.LOGS)


def _receive(request: Request, session: Session, body: bytes, principal: Principal,
             signal: service.Signal) -> Response:
    answer, kind = service.receive(session, principal, body, request.headers.get("content-type", ""),
                                   request.headers.get("content-encoding", ""), get_settings(),
                                   signal)
    return Response(answer, media_type=kind)
