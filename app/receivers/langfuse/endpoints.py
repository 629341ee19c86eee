"""`POST /api/public/ingestion`: Langfuse's SDKs point at tracelearn with their host setting.

Auth maps Langfuse's key pair onto our scoped API keys: the public key is the key's
`tl_<prefix>`, the secret key is the whole API key (`tl_<prefix>_<secret>`; the part after the
prefix alone works too). The key needs the `ingest` scope.
"""

from __future__ import annotations

from fastapi import APIRouter, Body, Depends
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from app.auth.service import Principal
from app.dependencies import get_session, receiver_principal
from app.receivers.langfuse import service
from app.receivers.langfuse.schemas import IngestionBatch, IngestionResult
from app.settings import get_settings

router = APIRouter(prefix="/api/public", tags=["receivers"])


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
    principal: Principal = Depends(receiver_principal),
    session: Session = Depends(get_session, scope="function"),
) -> JSONResponse:
    result = service.ingest_batch(session, principal, body.batch, get_settings())
    return JSONResponse(result.model_dump(mode="json"), status_code=207)
