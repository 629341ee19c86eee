"""`POST /otlp/v1/traces` and Langfuse's `POST /api/public/otel/v1/traces`: point an OTLP/HTTP
exporter's traces endpoint here (and its logs endpoint at `/otlp/v1/logs`, for instrumentations
that export a call's messages as log events).

Auth as the other receivers: `Authorization: Bearer <API key>` (the exporter's `headers`
setting), or Basic with the Langfuse key pair; the key needs the `ingest` scope. The answer is an
ExportTraceServiceResponse in the request's encoding (protobuf or JSON), with
`partial_success` counting the spans that were not stored and why.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from app.auth.service import Principal
from app.dependencies import SessionDep, receiver_principal
from app.receivers.otlp import service
from app.settings import get_settings

router = APIRouter(tags=["receivers"])

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
    answer, kind = service.receive(session, principal, body, request.headers.get("content-type", ""),
                                   request.headers.get("content-encoding", ""), get_settings())
    return Response(answer, media_type=kind)


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
    answer, kind = service.receive(session, principal, body, request.headers.get("content-type", ""),
                                   request.headers.get("content-encoding", ""), get_settings(),
                                   service.LOGS)
    return Response(answer, media_type=kind)
