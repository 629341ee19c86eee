"""PII redaction before storage: configured patterns replaced by typed placeholders.

Order matters: specific identifiers (SSN, MRN, DOB) are matched before the generic phone pattern
so a social security number is never counted as a phone number.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

_MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|Jun(?:e)?|Jul(?:y)?|Aug(?:ust)?|"
    r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
)
_DATE = (
    r"(?:\d{4}-\d{2}-\d{2}|\d{1,2}/\d{1,2}/\d{2,4}|\d{1,2}-\d{1,2}-\d{2,4}|"
    rf"{_MONTH}\.? \d{{1,2}},? \d{{4}}|\d{{1,2}} {_MONTH}\.? \d{{4}})"
)

PATTERNS: dict[str, re.Pattern[str]] = {
    "EMAIL": re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b"),
    "SSN": re.compile(r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b"),
    "MRN": re.compile(
        r"\b(?:MRN|medical record(?: number| no\.?)?|record #|patient id)\s*[:#]?\s*[A-Z]{0,3}\d{5,10}\b",
        re.IGNORECASE,
    ),
    "DOB": re.compile(
        rf"\b(?:DOB|D\.O\.B\.|date of birth|born(?: on)?)\s*[:\-]?\s*{_DATE}", re.IGNORECASE
    ),
    "PHONE": re.compile(
        r"(?<!\w)(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}\b"
    ),
}
DEFAULT_KINDS = tuple(PATTERNS)
# Every pattern needs a digit or an "@": one cheap search lets most short strings (metadata
# leaves, answers) skip the five pattern scans.
_MAYBE_PII = re.compile(r"[0-9@]")


@dataclass
class Redactor:
    kinds: tuple[str, ...] = DEFAULT_KINDS
    counts: Counter[str] = field(default_factory=Counter)

    def text(self, value: str) -> str:
        if not _MAYBE_PII.search(value):
            return value
        for kind in self.kinds:
            pattern = PATTERNS[kind]
            value, n = pattern.subn(f"[{kind}]", value)
            if n:
                self.counts[kind] += n
        return value

    def messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [self.message(m) for m in messages]

    def message(self, message: dict[str, Any]) -> dict[str, Any]:
        """Redacts what people write — text content, text parts, refusals, tool-call arguments —
        and leaves structure (roles, ids, URLs, tool names) as sent."""
        copy = dict(message)
        content = copy.get("content")
        if isinstance(content, str):
            copy["content"] = self.text(content)
        elif isinstance(content, list):
            copy["content"] = [self._part(p) for p in content]
        if isinstance(copy.get("refusal"), str):
            copy["refusal"] = self.text(copy["refusal"])
        if isinstance(copy.get("tool_calls"), list):
            copy["tool_calls"] = [self._call(c) for c in copy["tool_calls"]]
        return copy

    def _part(self, part: Any) -> Any:
        if isinstance(part, dict):
            for key in ("text", "refusal"):
                if isinstance(part.get(key), str):
                    return part | {key: self.text(part[key])}
        return part

    def _call(self, call: Any) -> Any:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            return call | {"function": function | {"arguments": self.text(function["arguments"])}}
        return call

    def value(self, value: Any) -> Any:
        """Redacts string leaves of a JSON value (metadata)."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.value(v) for v in value]
        if isinstance(value, dict):
            return {k: self.value(v) for k, v in value.items()}
        return value
