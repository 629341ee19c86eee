from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from app.auth.service import Principal, Scope
from app.dependencies import SessionDep, require
from app.feedback import service
from app.feedback.schemas import FeedbackIn, FeedbackResult
from app.settings import get_settings

router = APIRouter(prefix="/feedback", tags=["feedback"])


@router.post(
    "",
    status_code=207,
    response_model=FeedbackResult,
    summary="Submit outcomes for traces (late labels)",
    description="Outcomes for traces not yet ingested are kept and joined when the trace arrives. "
    "Keyed by (trace, name). Feedback outranks the outcome sent inline with the trace; of two "
    "feedback labels the later `labelled_at` wins (default: arrival time); one the stored label "
    "outranks is answered `outranked` and changes nothing. Retried traces never change an "
    "outcome. Every change is audited.",
    responses={207: {"model": FeedbackResult}, 413: {"description": "Batch too large"}},
)
def submit_feedback(
    session: SessionDep,
    body: FeedbackIn,
    principal: Principal = Depends(require(Scope.ingest)),
) -> JSONResponse:
    result = service.submit(session, principal, body.outcomes, get_settings())
    return JSONResponse(result.model_dump(mode="json"), status_code=207)
