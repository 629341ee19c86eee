"""Domain errors; ``app.problems`` maps them to RFC 9457 problem+json in one handler.

Every error has a stable ``type`` URI so clients can branch on it without parsing prose.
"""

from __future__ import annotations

from typing import Any

PROBLEM_BASE = "https://tracelearn.dev/problems/"
PROBLEM_JSON = "application/problem+json"


class DomainError(Exception):
    """Base of the errors services raise; routes never build error responses themselves."""

    status = 400
    type = "bad-request"
    title = "Bad request"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def problem(self) -> dict[str, Any]:
        return problem_body(self.status, self.type, self.title, self.detail, **self.extra)


class NotFound(DomainError):
    status, type, title = 404, "not-found", "Not found"


class Conflict(DomainError):
    status, type, title = 409, "conflict", "Conflict"


class InvalidInput(DomainError):
    status, type, title = 422, "invalid-input", "Invalid input"


class PayloadTooLarge(DomainError):
    status, type, title = 413, "payload-too-large", "Payload too large"


class Unauthorized(DomainError):
    status, type, title = 401, "unauthorized", "Missing or invalid credentials"


class Forbidden(DomainError):
    status, type, title = 403, "forbidden", "Insufficient scope"


class RateLimited(DomainError):
    status, type, title = 429, "rate-limited", "Too many requests"


class ServiceUnavailable(DomainError):
    status, type, title = 503, "unavailable", "Service temporarily unavailable"


class IllegalTransition(Conflict):
    type, title = "illegal-transition", "Illegal state transition"


def problem_body(status: int, type_: str, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    """A problem+json body that can always be rendered: a lone surrogate quoted from the input
    (in a detail, an error location or message) is escaped, not left to fail the response."""
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + type_,
        "title": title,
        "status": status,
        "detail": printable(detail),
    }
    body.update({key: _renderable(value) for key, value in extra.items()})
    return body


def printable(text: str) -> str:
    """``text`` safe to put in a JSON response: lone surrogates become ``\\udXXX`` escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _renderable(value: Any) -> Any:
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, list | tuple):
        return [_renderable(v) for v in value]
    if isinstance(value, dict):
        return {printable(str(k)): _renderable(v) for k, v in value.items()}
    return value
