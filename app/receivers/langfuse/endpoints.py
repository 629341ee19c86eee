"""`POST /api/public/ingestion`: Langfuse's SDKs point at tracelearn with their host setting.

Auth maps Langfuse's key pair onto our scoped API keys: the public key is the key's
`tl_<prefix>`, the secret key is the whole API key (`tl_<prefix>_<secret>`; the part after the
prefix alone works too). The key needs the `ingest` scope.
"""

from __future__ import annotations

import base64
import binascii

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from app.auth.service import Principal, Scope, authenticate
from app.dependencies import get_session, rate_limiter
from app.errors import Forbidden, Unauthorized
from app.receivers.langfuse import service
from app.receivers.langfuse.schemas import IngestionBatch, IngestionResult
from app.settings import get_settings

router = APIRouter(prefix="/api/public", tags=["receivers"])


def _raw_key(header: str) -> str | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() != "basic":
        return None
    try:
        public, _, secret = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return secret if secret.startswith(f"{public}_") else f"{public}_{secret}"


def langfuse_principal(
    request: Request, session: Session = Depends(get_session, scope="function")
) -> Principal:
    raw = _raw_key(request.headers.get("authorization", ""))
    principal = authenticate(session, raw) if raw else None
    if principal is None:
        raise Unauthorized("send Basic auth with public key `tl_<prefix>` and your tracelearn "
                           "API key as the secret key")
    rate_limiter.check(principal.key_id, get_settings().rate_limit_per_minute)
    if Scope.ingest not in principal.scopes and Scope.admin not in principal.scopes:
        raise Forbidden("this route needs the 'ingest' scope")
    request.state.principal = principal
    return principal


langfuse_principal.required_scope = Scope.ingest  # type: ignore[attr-defined]


@router.post(
    "/ingestion",
    status_code=207,
    response_model=IngestionResult,
    summary="Langfuse ingestion batch: generations become traces, scores become outcomes",
    description="Answers 207 with one success or error per event. Generations are staged until "
    "they have input and output; `metadata.policy` (on the generation or its trace) names the "
    "policy. Spans and events are acknowledged and not stored.",
)
def ingestion(
    body: IngestionBatch = Body(...),
    principal: Principal = Depends(langfuse_principal),
    session: Session = Depends(get_session, scope="function"),
) -> JSONResponse:
    result = service.ingest_batch(session, principal, body.batch, get_settings())
    return JSONResponse(result.model_dump(mode="json"), status_code=207)
