from __future__ import annotations

from fastapi import APIRouter, Depends, Header, Response
from fastapi.responses import StreamingResponse

from app.auth.service import Principal, Scope
from app.dependencies import SessionDep, require
from app.proxy import service
from app.proxy.schemas import ChatCompletionIn, ChatCompletionOut
from app.settings import get_settings

router = APIRouter(tags=["proxy"])


@router.post(
    "/chat/completions",
    response_model=ChatCompletionOut,
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "JSON, or server-sent events when `stream` is true."}},
)
def chat_completions(
    session: SessionDep,
    body: ChatCompletionIn,
    response: Response,
    x_tracelearn_external_id: str | None = Header(
        default=None, max_length=256,
        description="Use this as the completion id and trace external_id (idempotent retries).",
    ),
    principal: Principal = Depends(require(Scope.ingest)),
) -> ChatCompletionOut | StreamingResponse:
    settings = get_settings()
    if body.stream:
        route = service.resolve(session, principal, body, settings, x_tracelearn_external_id)
        return StreamingResponse(
            service.stream(principal, body, route, settings),
            media_type="text/event-stream",
            headers={"x-tracelearn-snapshot": route.served_name,
                     "x-tracelearn-trace-id": route.completion_id,
                     "cache-control": "no-cache"},
        )
    out, route, status = service.complete(session, principal, body, settings,
                                          x_tracelearn_external_id)
    response.headers["x-tracelearn-snapshot"] = route.served_name
    response.headers["x-tracelearn-trace-status"] = status
    return out
