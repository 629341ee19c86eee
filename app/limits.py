"""Request-body guards applied before any route sees the body: size (413), JSON depth (400),
values no database can store (NaN/Infinity/overflowing numbers: 400) and refused strings (lone
surrogates, NUL, other control characters: 422, the check of ``app.traces.strings``).

The ingest routes (``PER_ITEM_PATHS``) run the same string check themselves, item by item, so
that one poisoned item of a batch is reported ``invalid`` while the others are stored; the
middleware leaves their strings to them.

They run as ASGI middleware so an oversize body is refused while streaming, not after buffering.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any, NamedTuple

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import PROBLEM_JSON, problem_body
from app.patterns import Pattern, PatternSet
from app.traces.strings import describe, problem_type, string_problems

PER_ITEM_PATHS = frozenset({"/v1/traces", "/v1/feedback", "/v1/chat/completions",
                            "/api/public/ingestion", "/otlp/v1/traces",
                            "/api/public/otel/v1/traces", "/otlp/v1/logs",
                            "/api/public/otel/v1/logs"})
"""Routes whose services check every string per item (batches) or answer in their own shape
(the OpenAI proxy)."""


# A JSON string, escapes included; an unterminated one runs to the end of the body (as a scan
# that never sees its closing quote reads it).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_NOT_QUOTES_OR_BRACKETS = bytes(b for b in range(256) if b not in b'"[]{}')
_BRACKET_STEP = [0] * 256
_BRACKET_STEP[ord("[")] = _BRACKET_STEP[ord("{")] = 1
_BRACKET_STEP[ord("]")] = _BRACKET_STEP[ord("}")] = -1


def json_depth_exceeds(body: bytes, limit: int, marks: BodyMarks | None = None) -> bool:
    """True when brackets nest deeper than ``limit`` outside of strings (linear, with no
    parser, so a pathological body cannot blow the parser's recursion). In C but for the last
    step: strings cut out, every byte but brackets dropped, then the deepest running depth.
    ``marks``: the body's, when the caller has them."""
    if body.count(b"[") + body.count(b"{") <= limit:  # cannot nest deeper than it opens
        return False
    # Backslash pairs out first (in a string a pair is one escaped backslash; outside one, two
    # bytes that count for nothing). Where no backslash-quote is left, every quote opens or
    # closes a string and a split on quotes cuts the strings out (~1 ms for a 1 MB batch against
    # ~8 ms for the regex, which also reads escaped quotes). A body without any backslash-quote
    # (most: ``marks``) has none left either, and its pairs hold no quote nor bracket, so it is
    # read as it is.
    marks = marks or body_marks(body)
    unpaired = body.replace(b"\\\\", b"") if marks.backslash_quote else body
    if marks.backslash_quote and b'\\"' in unpaired:
        outside = _JSON_STRING.sub(b"", body)
    else:
        # Quotes and brackets alone: a string without brackets leaves two adjacent quotes, so
        # where dropping the pairs leaves no quote, no string holds a bracket and what is left
        # is the brackets outside strings (~1 ms of C for a 1 MB batch, where the split makes a
        # bytes object per string: ~3 ms).
        outside = unpaired.translate(None, _NOT_QUOTES_OR_BRACKETS).replace(b'""', b"")
        if b'"' in outside:
            outside = b"".join(unpaired.split(b'"')[::2])
    brackets = outside.translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0) > limit


class BodyMarks(NamedTuple):
    """What one pass over a request body (``body_marks``) found; each a cheap precheck that
    only sends the body that trips it down the exact (slower) path."""

    suspect_number: bool
    """"NaN", "Infinity", an exponent of three digits or more, or 300 digits in a row."""
    long_integer: bool
    """19 digits in a row: where integers beyond 64 bits may start, which orjson would read as
    floats (a changed value, where Python's parser keeps them exact)."""
    backslash_quote: bool
    """A backslash before a quote: an escaped quote, or an escaped backslash closing a string."""


_SUSPECT_NUMBER, _LONG_INTEGER, _BACKSLASH_QUOTE = range(3)
_BODY_MARKS = PatternSet([
    Pattern(_SUSPECT_NUMBER, rb"NaN|Infinity|[eE]\+?[0-9]{3}|[0-9]{300}"),
    Pattern(_LONG_INTEGER, rb"[0-9]{19}"),
    Pattern(_BACKSLASH_QUOTE, rb'\\"'),
])


_FOLDED_BELOW = 16_384
# Every digit read as "0" and "E" as "e": the digit runs and exponents ``_BODY_MARKS`` looks
# for are then plain substrings.
_FOLD_DIGITS = bytes.maketrans(b"123456789E", b"000000000e")
_DIGITS_19, _DIGITS_300 = b"0" * 19, b"0" * 300


def body_marks(body: bytes) -> BodyMarks:
    """The body's marks, in one pass (~0.3 ms for a 1 MB batch, where the substring searches
    and the folding copy they replace took ~3). A body under ``_FOLDED_BELOW`` (a single
    trace, read on the event loop) is folded instead (``_FOLD_DIGITS``) and searched for
    substrings, in C and under the GIL: ~2 µs for 1 KB, where ``re`` takes ~24 µs and
    Vectorscan releases the GIL (``app.patterns``)."""
    if len(body) >= _FOLDED_BELOW:
        hits = _BODY_MARKS.matched(body)
        return BodyMarks(_SUSPECT_NUMBER in hits, _LONG_INTEGER in hits,
                         _BACKSLASH_QUOTE in hits)
    folded = body.translate(_FOLD_DIGITS)
    return BodyMarks(
        suspect_number=(b"NaN" in body or b"Infinity" in body or b"e000" in folded
                        or b"e+000" in folded or _DIGITS_300 in folded),
        long_integer=_DIGITS_19 in folded,
        backslash_quote=b'\\"' in body)


# Lone surrogates and control characters can only arrive in JSON as escapes: \u0000-\u001f,
# \b, \f, or \ud800-\udfff (a valid pair is let through by the exact check).
_SUSPECT_STRING = re.compile(rb"\\(?:u00[01][0-9a-fA-F]|u[dD][89a-fA-F][0-9a-fA-F]{2}|[bf])")


class _NonFinite(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NonFinite(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(text)
    return value


def unstorable_json(
    body: bytes, check_strings: bool = True, marks: BodyMarks | None = None,
) -> tuple[int, str, str, str] | None:
    """A problem (status, type, title, detail) when the JSON holds values neither Postgres nor
    a JSON response can carry: NaN/Infinity (not JSON at all, but Python's parser accepts them),
    numbers that overflow a double, or (with ``check_strings``) refused strings (lone
    surrogates, NUL, control characters). None when the body is fine or is not JSON (the
    route's parser reports that). ``marks``: the body's, when the caller has them."""
    suspect_number = (marks or body_marks(body)).suspect_number
    suspect_string = check_strings and _SUSPECT_STRING.search(body) is not None
    if not (suspect_number or suspect_string):
        return None
    try:
        # orjson refuses NaN, Infinity and numbers that overflow a double by itself, in C: a
        # body it reads holds none of them, and it is the common suspect ("E1234" in a note).
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        # What it refuses may still be fine to Python's parser (a lone surrogate, a big
        # integer): the exact check tells.
        try:
            parsed = json.loads(body, parse_constant=_reject_constant,
                                parse_float=_finite_float)
        except _NonFinite:
            return (400, "non-finite-number", "Number out of range",
                    "JSON numbers must be finite: NaN, Infinity and overflowing values are "
                    "refused")
        except (ValueError, RecursionError):
            return None
    problems = string_problems(parsed) if suspect_string else []
    if problems:
        return (422, *problem_type(problems), f"a refused string: {describe(problems)}")
    return None


def parse_json(body: bytes, marks: BodyMarks | None = None) -> Any:
    """A request body's JSON value, as Python's parser reads it, but read by orjson (several
    times faster, in C) wherever that gives the same value: not for integers beyond 64 bits nor
    for what orjson refuses and Python accepts (a lone surrogate escape, which the string check
    must see to report it). Raises ``ValueError`` for a body that is not JSON. NaN and Infinity
    never get here: ``BodyLimitMiddleware`` refuses them first. ``marks``: the body's, when the
    caller has them."""
    if not (marks or body_marks(body)).long_integer:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    return json.loads(body)


async def _send_problem(send: Send, status: int, type_: str, title: str, detail: str) -> None:
    payload = json.dumps(problem_body(status, type_, title, detail)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", PROBLEM_JSON.encode()),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def body_problem(
    path: str, content_type: bytes, body: bytes, max_depth: int,
    marks: BodyMarks | None = None,
) -> tuple[int, str, str, str] | None:
    """Why a request body within the size limit is refused before it reaches any route, as
    (status, problem type, title, detail), or None: JSON nested deeper than ``max_depth``, or
    JSON no database column can hold (``unstorable_json``; strings are checked here only on
    paths that do not check them item by item, ``PER_ITEM_PATHS``). ``marks``: the body's,
    when the caller has them."""
    if b"json" not in content_type:
        return None
    marks = marks or body_marks(body)
    if json_depth_exceeds(body, max_depth, marks):
        return (400, "json-too-deep", "JSON nested too deeply",
                f"request JSON nests deeper than {max_depth} levels")
    return unstorable_json(body, check_strings=path not in PER_ITEM_PATHS, marks=marks)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, max_depth: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # A NUL in a path parameter or query value would reach the database (Postgres refuses it
        # with an error that is not the client's to see as a 5xx).
        if "\x00" in scope.get("path", "") or b"%00" in scope.get("query_string", b"").lower():
            await _send_problem(
                send, 422, "nul-character", "NUL character",
                "the URL must not contain the NUL character (%00)",
            )
            return
        if scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_problem(
                send, 413, "payload-too-large", "Payload too large",
                f"request body is {int(declared)} bytes; the limit is {self.max_bytes}",
            )
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _send_problem(
                    send, 413, "payload-too-large", "Payload too large",
                    f"request body exceeds the limit of {self.max_bytes} bytes",
                )
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        problem = body_problem(scope["path"], headers.get(b"content-type", b""), body,
                               self.max_depth)
        if problem is not None:
            await _send_problem(send, *problem)
            return
        sent = False

        async def _receive() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, _receive, send)


SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
        b"script-src 'self'; frame-ancestors 'none'; form-action 'self'",
    ),
]
"""Conservative headers on every response; the dashboard needs no third-party origin."""


class SecurityHeadersMiddleware:
    """``SECURITY_HEADERS`` on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def _send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, _send)
