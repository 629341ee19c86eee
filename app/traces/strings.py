"""The one check every string the API and the proxy accept goes through, keys of free-form JSON
(``metadata``, tool arguments schemas, …) included.

Refused, wherever they sit:
- lone surrogates (U+D800–U+DFFF): JSON's ``\\ud800`` escape yields one, but no UTF-8 text can
  hold it, so it cannot be hashed, stored in Postgres or sent back in a response;
- NUL and the other C0 controls (U+0000–U+001F) except tab, newline and carriage return:
  Postgres refuses NUL, and the others are never part of a prompt or an answer worth learning;
- strings longer than ``MAX_STRING_CHARS`` and keys longer than ``MAX_KEY_CHARS``.

Text in a non-NFC form (``e`` + combining accent) is not hostile: it is stored as given, since
normalising would change what the client's model saw and break the client's content hash.

The check is pure: it walks a JSON value and returns the problems in pydantic's error shape
(``loc``, ``msg``, ``type``) with every location made printable, so a problem can always be
rendered in a response even when the string it describes cannot.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import orjson

from app.errors import printable

MAX_STRING_CHARS = 200_000
"""The longest string anywhere (the message and response limit of the chat format)."""
MAX_KEY_CHARS = 256
"""The longest key of a JSON object."""

_HOSTILE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def string_problem(
    text: str, max_chars: int = MAX_STRING_CHARS, *, allow_controls: bool = False
) -> tuple[str, str] | None:
    """(type, message) for a refused string, None for an acceptable one. ``allow_controls``
    lets control characters other than NUL through (text a model generated, stored as is)."""
    if len(text) > max_chars:
        return "string_too_long", f"the string has {len(text)} characters; the limit is {max_chars}"
    found = (_UNSTORABLE if allow_controls else _HOSTILE).search(text)
    if found is None:
        return None
    char = found.group()
    if "\ud800" <= char <= "\udfff":
        return "lone_surrogate", f"lone surrogate U+{ord(char):04X} (not valid Unicode text)"
    if char == "\x00":
        return "nul_character", "the NUL character (U+0000) is not allowed"
    return "control_character", (
        f"control character U+{ord(char):04X} is not allowed (tab, newline and carriage "
        "return are)"
    )


_PROBLEM_TYPES = {
    "lone_surrogate": ("lone-surrogate", "Lone surrogate"),
    "nul_character": ("nul-character", "NUL character"),
    "control_character": ("control-character", "Control character"),
    "string_too_long": ("string-too-long", "String too long"),
}


def problem_type(errors: list[dict[str, Any]]) -> tuple[str, str]:
    """The problem+json type and title for refused strings, named after the first one."""
    return _PROBLEM_TYPES[errors[0]["type"]]


def describe(errors: list[dict[str, Any]]) -> str:
    """One line naming the first refused string and where it is."""
    where = ".".join(errors[0]["loc"])
    return f"{errors[0]['msg']} (at {where})" if where else errors[0]["msg"]


def string_problems(
    value: Any, loc: tuple[str | int, ...] = (), *, allow_controls: bool = False
) -> list[dict[str, Any]]:
    """Every refused string (or key) in a JSON value, in pydantic's error shape."""
    if _certainly_clean(value):
        return []
    return list(_walk(value, loc, allow_controls))


# In orjson's encoding every refused control character is one of these escapes (a literal
# backslash before "b" or "f" trips it too, which only costs the walk).
_ESCAPED_CONTROL = re.compile(rb"\\u00[01]|\\[bf]")
# A key longer than the limit, in the encoding with escaped backslashes and quotes blanked: a
# quote, more bytes than the limit (each character is one or more) and none of them a quote,
# then the ``":`` that ends a key. One search in C, where splitting at every ``":`` made a
# Python loop over the keys.
_LONG_KEY = re.compile(rb'"[^"]{%d,}+":' % (MAX_KEY_CHARS + 1))


def _certainly_clean(value: Any) -> bool:
    """True when no string or key of ``value`` can be refused, judged on its orjson encoding
    in C rather than by walking it in Python: orjson refuses lone surrogates itself, a refused
    control character shows as its escape, and no string can be longer than the encoding.
    Keys: with escaped backslashes and quotes blanked, each quote left delimits a string, so
    the bytes between a ``":`` and the quote before it hold the key, at least one byte a
    character. False (the walk decides) when unsure."""
    try:
        encoded = orjson.dumps(value)
    except TypeError:  # a lone surrogate, a non-string key, an integer beyond 64 bits, …
        return False
    if len(encoded) > MAX_STRING_CHARS or _ESCAPED_CONTROL.search(encoded):
        return False
    blanked = encoded.replace(b"\\\\", b"__").replace(b'\\"', b"__")
    return _LONG_KEY.search(blanked) is None


def _walk(value: Any, loc: tuple[str | int, ...], controls: bool) -> Iterator[dict[str, Any]]:
    if isinstance(value, str):
        problem = string_problem(value, allow_controls=controls)
        if problem is not None:
            yield _error(loc, *problem)
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str):
                problem = string_problem(key, MAX_KEY_CHARS, allow_controls=controls)
                if problem is not None:
                    yield _error((*loc, key), problem[0], "key: " + problem[1])
            yield from _walk(item, (*loc, key), controls)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _walk(item, (*loc, i), controls)


def _error(loc: tuple[str | int, ...], type_: str, msg: str) -> dict[str, Any]:
    return {"loc": [printable(str(p))[:MAX_KEY_CHARS] for p in loc], "msg": msg, "type": type_}
