"""PII redaction before storage: detected identifiers replaced by typed placeholders.

Detectors run in order over each text, each replacing what it finds by ``[KIND]``; a checksum or
a parser confirms a candidate where one exists, so random digit runs survive:

- ``EMAIL``;
- ``IBAN``: two letters, two check digits, up to 30 letters/digits (spaced in fours or not),
  kept only when the ISO 13616 mod-97 check holds;
- ``CARD``: 13–19 digits, unbroken or grouped by spaces or dashes, with the prefix of a card
  network (Visa 4, Mastercard 51–55/2221–2720, Amex 34/37, Discover 6011/644–649/65, JCB 35,
  Diners 36/38) and a valid Luhn check digit;
- ``SSN``: ``123-45-6789`` anywhere (the dashed layout is an SSN's own); ``123 45 6789`` and
  ``123456789`` only after an SSN keyword (``SSN``, ``social security (number|no)``, ``SS#``)
  within a few characters, because a bare nine-digit number is as often an order, a lot or an
  accession number, and destroying those would destroy data;
- ``MRN`` (after its keyword) and ``DOB`` (a date after a birth keyword), as before: other dates
  are clinical facts (dates of therapy) and stay;
- ``IP``: IPv4 dotted quads with every part ≤ 255, and IPv6 addresses that parse;
- ``PHONE``: North-American numbers (``(617) 555-0142``, ``617-555-0142``) and international
  ones written with a ``+`` or ``00`` country prefix (``+44 20 7946 0958``), 8 to 15 digits;
- ``ADDRESS``: a US street address — house number, capitalised street name, a street suffix
  (``Street``, ``St``, ``Ave``, ``Rd``, ``Blvd``, ``Ln``, ``Dr``, …), an optional unit.

Order matters: IBANs and cards before phones (their digit groups would otherwise be read as
phone numbers), SSN/MRN/DOB before the generic phone pattern.

Redaction applies to messages, the response, metadata values and outcome string values. An
``external_id`` is never rewritten: it is the idempotency key, and ``user-[EMAIL]`` would merge
every user's traces and break retries; one that holds PII is refused instead (``app.traces.service``).
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable
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
_STREET_SUFFIX = (
    r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl|"
    r"Terrace|Ter|Circle|Cir|Parkway|Pkwy|Highway|Hwy|Square|Sq)"
)


def luhn_valid(digits: str) -> bool:
    """The Luhn check digit test card numbers carry."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


_CARD_PREFIX = re.compile(
    r"4|5[1-5]|2(?:22[1-9]|2[3-9]\d|[3-6]\d\d|7[01]\d|720)|3[47]|6011|64[4-9]|65|35|3[068]"
)


def card_number(text: str) -> bool:
    digits = re.sub(r"[ -]", "", text)
    return (13 <= len(digits) <= 19 and _CARD_PREFIX.match(digits) is not None
            and luhn_valid(digits))


def iban_valid(text: str) -> bool:
    """ISO 13616: country code and check digits moved to the end, letters as 10–35, mod 97 = 1."""
    compact = text.replace(" ", "").upper()
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _phone_digits(text: str) -> bool:
    return 8 <= sum(ch.isdigit() for ch in text) <= 15


@dataclass(frozen=True)
class Detector:
    """A pattern, and optionally a check a match must pass; a match with a ``pii`` group has
    only that group replaced (the keyword that gave the context stays)."""

    pattern: re.Pattern[str]
    check: Callable[[str], bool] | None = None


PATTERNS: dict[str, Detector] = {
    "EMAIL": Detector(re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")),
    "IBAN": Detector(
        re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"), iban_valid
    ),
    "CARD": Detector(re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])"), card_number),
    "SSN": Detector(re.compile(
        r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b"
        r"|(?i:\b(?:SSN|social security(?: number| no\.?)?|SS#))\s*(?:is|:|#|no\.?)?\s*"
        r"(?P<pii>(?!000|666|9\d\d)\d{3}(?P<sep> ?)(?!00)\d{2}(?P=sep)(?!0000)\d{4})\b"
    )),
    "MRN": Detector(re.compile(
        r"\b(?:MRN|medical record(?: number| no\.?)?|record #|patient id)\s*[:#]?\s*[A-Z]{0,3}\d{5,10}\b",
        re.IGNORECASE,
    )),
    "DOB": Detector(re.compile(
        rf"\b(?:DOB|D\.O\.B\.|date of birth|born(?: on)?)\s*[:\-]?\s*{_DATE}", re.IGNORECASE
    )),
    "IP": Detector(re.compile(
        r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
        r"(?![\d.]*\d)"
        r"|(?<![\w:])(?=[0-9A-Fa-f:]*:[0-9A-Fa-f:]*:)[0-9A-Fa-f:]{2,39}(?![\w:])"
    ), lambda m: "." in m or _ipv6(m)),
    "PHONE": Detector(re.compile(
        r"(?<!\w)(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}\b"
        r"|(?<![\w+])(?:\+|00)[1-9]\d{0,2}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?!\w)"
    ), _phone_digits),
    "ADDRESS": Detector(re.compile(
        r"\b\d{1,6}(?: [NSEW]\.?| North| South| East| West)?(?: [A-Z][a-z]+| \d{1,3}(?:st|nd|rd|th)){1,3} "
        rf"{_STREET_SUFFIX}\b\.?(?:,? (?:Apt|Suite|Ste|Unit|#)\.? ?[A-Za-z0-9-]+)?"
    )),
}
DEFAULT_KINDS = tuple(PATTERNS)
# Every detector needs a digit or an "@": one cheap search lets most short strings (metadata
# leaves, answers) skip the scans.
_MAYBE_PII = re.compile(r"[0-9@]")


def _replace(kind: str, detector: Detector, value: str) -> tuple[str, int]:
    found = 0

    def sub(match: re.Match[str]) -> str:
        nonlocal found
        group = "pii" if match.groupdict().get("pii") is not None else 0
        if detector.check is not None and not detector.check(match.group(group)):
            return match.group(0)
        found += 1
        if group == 0:
            return f"[{kind}]"
        start, end = match.span("pii")
        whole = match.group(0)
        offset = match.start(0)
        return whole[: start - offset] + f"[{kind}]" + whole[end - offset :]

    return detector.pattern.sub(sub, value), found


@dataclass
class Redactor:
    kinds: tuple[str, ...] = DEFAULT_KINDS
    counts: Counter[str] = field(default_factory=Counter)

    def text(self, value: str) -> str:
        if not _MAYBE_PII.search(value):
            return value
        for kind in self.kinds:
            value, n = _replace(kind, PATTERNS[kind], value)
            if n:
                self.counts[kind] += n
        return value

    def finds(self, value: str) -> list[str]:
        """The kinds of PII in ``value``, without counting them."""
        probe = Redactor(self.kinds)
        probe.text(value)
        return sorted(probe.counts)

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
