"""OpenAI-compatible routes: chat completions (answered by the serving snapshot and recorded as a
trace) and the policies listed as models. Errors here take OpenAI's shape
(``{"error": {"message", "type", "param", "code"}}``) so OpenAI SDKs can read them; the rest of
our API keeps problem+json."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.auth.service import Principal, Scope
from app.dependencies import SessionDep, require
from app.errors import DomainError, printable
from app.proxy import service
from app.proxy.schemas import ChatCompletionIn, ChatCompletionOut, ModelList, ModelOut, OpenAIError
from app.settings import get_settings

OPENAI_PATHS = ("/v1/chat/completions", "/v1/models")
"""Routes that answer errors in OpenAI's shape (the security tests read this)."""

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_error(
    status: int, message: str, param: str | None = None, code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    # A message or param may quote the input, lone surrogates included: escape what JSON
    # cannot carry.
    body = {"error": {"message": printable(message), "type": kind,
                      "param": None if param is None else printable(param), "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(f"[{p}]" if p.isdigit() else p for p in loc) or None
    message = str(first.get("msg", "The request did not validate."))
    return openai_error(400, f"{message} ({param})" if param else message, param=param,
                        code="invalid_value")


class OpenAIRoute(APIRoute):
    """Turns the errors raised while serving a route (auth, validation, domain) into OpenAI's
    error body; OpenAI answers validation errors with 400, so do we."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except DomainError as exc:
                extra = exc.extra
                headers = ({"Retry-After": str(extra["retry_after"])}
                           if "retry_after" in extra else None)
                status = 400 if exc.status == 422 else exc.status
                return openai_error(status, exc.detail, param=extra.get("param"),
                                    code=extra.get("code", exc.type.replace("-", "_")),
                                    headers=headers)
            except RequestValidationError as exc:
                return _validation_error(exc)
            except StarletteHTTPException as exc:
                return openai_error(exc.status_code, str(exc.detail),
                                    headers=dict(exc.headers) if exc.headers else None)

        return route


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator however the response ends, so a stream the client abandons
    runs its ``finally`` (records the trace as aborted) now rather than whenever it is
    garbage-collected."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIError} for code in (400, 401, 403, 404, 409, 429, 503)
}
router = APIRouter(tags=["proxy"], route_class=OpenAIRoute, responses=_ERRORS)


@router.get("/models", response_model=ModelList, summary="Policies, listed as OpenAI models")
def list_models(
    session: SessionDep,
    principal: Principal = Depends(require(Scope.ingest)),
) -> ModelList:
    return service.models(session, principal)


@router.get("/models/{policy_name}", response_model=ModelOut, summary="One policy, as a model")
def get_model(
    session: SessionDep,
    policy_name: str,
    principal: Principal = Depends(require(Scope.ingest)),
) -> ModelOut:
    return service.model(session, principal, policy_name)


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
        description="Use this as the completion id and trace external_id: a retry with the same "
        "id and request gets the stored answer back (streamed too); another request with the "
        "same id is a 409.",
    ),
    principal: Principal = Depends(require(Scope.ingest)),
) -> ChatCompletionOut | StreamingResponse:
    settings = get_settings()
    if body.stream:
        route = service.resolve(session, principal, body, settings, x_tracelearn_external_id)
        stored = service.stored_answer(session, principal, route)
        return ClosingStreamingResponse(
            service.stream(principal, route, settings, stored),
            media_type="text/event-stream",
            headers={"x-tracelearn-snapshot": route.served_name,
                     "x-tracelearn-trace-id": route.completion_id,
                     "x-tracelearn-trace-status": "duplicate" if stored else "created",
                     "cache-control": "no-cache"},
        )
    out, route, status = service.complete(session, principal, body, settings,
                                          x_tracelearn_external_id)
    response.headers["x-tracelearn-snapshot"] = route.served_name
    response.headers["x-tracelearn-trace-status"] = status
    return out
