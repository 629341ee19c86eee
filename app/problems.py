"""The HTTP face of errors: every domain error, validation error and HTTP error becomes RFC 9457
problem+json, in the handlers installed here and nowhere else."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import PROBLEM_JSON, DomainError, problem_body


def problem_response(
    status: int,
    type_: str,
    title: str,
    detail: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    return JSONResponse(
        problem_body(status, type_, title, detail, **extra),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def problem_json(body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    """A problem body the domain already shaped (``app.errors.problem_body``), as a response."""
    return JSONResponse(body, status_code=int(body["status"]), media_type=PROBLEM_JSON,
                        headers=headers)


_HTTP_TYPES = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Missing or invalid credentials"),
    403: ("forbidden", "Insufficient scope"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    406: ("not-acceptable", "Not acceptable"),
    413: ("payload-too-large", "Payload too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
    422: ("invalid-input", "Invalid input"),
    429: ("rate-limited", "Too many requests"),
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> JSONResponse:
        headers = (
            {"Retry-After": str(exc.extra["retry_after"])} if "retry_after" in exc.extra else None
        )
        return problem_response(
            exc.status, exc.type, exc.title, exc.detail, headers=headers, **exc.extra
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "loc": [str(p) for p in e.get("loc", ())],
                "msg": str(e.get("msg", "")),
                "type": str(e.get("type", "")),
            }
            for e in exc.errors()
        ]
        return problem_response(
            422, "invalid-input", "Invalid input", "The request did not validate.", errors=errors
        )

    @app.exception_handler(OperationalError)
    async def _db_down(_: Request, exc: OperationalError) -> JSONResponse:
        # The database is unreachable or restarting: a retryable condition, not a bug.
        return problem_response(
            503,
            "unavailable",
            "Service temporarily unavailable",
            "the database is unavailable; retry later",
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(DataError)
    async def _data_error(_: Request, exc: DataError) -> JSONResponse:
        # SQLSTATE class 22 (value out of range, untranslatable character, …): the input held a
        # value the database cannot store. The transaction was rolled back, so nothing is written.
        return problem_response(
            422, "unstorable-value", "Value cannot be stored",
            "a value in the request is out of range or holds characters the database refuses",
        )

    @app.exception_handler(OverflowError)
    async def _overflow(_: Request, exc: OverflowError) -> JSONResponse:
        # SQLite's driver raises this (not a DBAPI error) for integers beyond 64 bits.
        return problem_response(
            422, "unstorable-value", "Value cannot be stored",
            "an integer in the request is out of range",
        )

    @app.exception_handler(DBAPIError)
    async def _db_error(_: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated:
            return problem_response(
                503,
                "unavailable",
                "Service temporarily unavailable",
                "the database connection was lost; retry later",
                headers={"Retry-After": "5"},
            )
        raise exc

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_, title = _HTTP_TYPES.get(exc.status_code, ("http-error", "HTTP error"))
        headers = dict(exc.headers) if exc.headers else None
        return problem_response(exc.status_code, type_, title, str(exc.detail), headers=headers)
