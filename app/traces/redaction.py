"""PII redaction before storage: detected identifiers replaced by typed placeholders.

Detectors run in order over each text; what one claims is hidden from the ones after it. A
checksum or a parser confirms a candidate where one exists, so random digit runs survive:

- ``EMAIL``;
- ``IBAN``: two letters, two check digits and the account (spaced in fours or not), kept only
  when ``python-stdnum`` accepts it: the country's length and format from the IBAN registry and
  the ISO 7064 mod-97 check (not its national bank-code lists, which lag behind new banks);
- ``CARD``: 13–19 digits, unbroken or grouped by spaces or dashes, with the prefix of a card
  network (Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay, Maestro, Mir), a length that
  network issues, and a valid Luhn check digit; digits run on (a CVV) are tried off group by
  group;
- ``SSN``: ``123-45-6789`` anywhere (the dashed layout is an SSN's own); ``123 45 6789`` and
  ``123456789`` only after an SSN keyword, because a bare nine-digit number is as often an
  order, a lot or an accession number, and destroying those would destroy data;
- ``MRN`` (an identifier after a medical-record keyword) and ``DOB`` (a date after a birth
  keyword, in English, French, German, Spanish or Italian): other dates are clinical facts
  (dates of therapy) and stay; the keyword stays too;
- ``IP``: IPv4 dotted quads with every part ≤ 255 (not after "version", "build", "firmware"…), and IPv6
  addresses that ``ipaddress`` parses;
- ``PHONE``: ``phonenumbers`` finds numbers valid in their region's numbering plan: written
  internationally (``+44 20 7946 0958``, ``0049 30 901820``) for any region, North-American
  national ones with separators (``(617) 555-0142``), and after a phone keyword (``tel``,
  ``call``, ``mobile``…) unbroken ones and the national layouts of common regions
  (``Tel. 020 7946 0958``, ``Handy 0151 23456789``);
- ``ADDRESS``: a US street address — house number, street name, a street suffix (``Street``,
  ``St``, ``Ave``, ``Rd``, ``Blvd``, ``Ln``, ``Dr``, …), optional directional, unit, and
  ``City, ST 12345`` — and PO boxes.

Order matters: IBANs and cards before phones (their digit groups would otherwise be read as
phone numbers), SSN/MRN/DOB before the generic phone search.

Three modes (per tenant, ``app.tenants``): ``mask`` writes ``[KIND]``; ``hash`` writes
``[KIND:<12 hex>]``, an HMAC of the normalised value (digits only, an email lower-cased, a phone
in E.164) under a per-tenant key, so the same person's number is the same token in every trace
and across layouts while the value itself is not stored; ``off`` stores text as sent.

Redaction applies to messages, the response, metadata values and outcome string values. An
``external_id`` is never rewritten: it is the idempotency key, and ``user-[EMAIL]`` would merge
every user's traces and break retries; one that holds PII is refused instead (``app.traces.service``).
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import hmac
import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import phonenumbers
from stdnum import iban as stdnum_iban

from app.patterns import Pattern, PatternSet


class RedactionMode(enum.StrEnum):
    mask = "mask"
    hash = "hash"
    off = "off"


@dataclass(frozen=True)
class Span:
    """One finding: ``text[start:end]`` is PII of ``kind``; ``value`` is its normalised form."""

    kind: str
    start: int
    end: int
    value: str


_MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|Jun(?:e)?|Jul(?:y)?|Aug(?:ust)?|"
    r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
)
_DAY = r"\d{1,2}(?:st|nd|rd|th)?"
_DATE = (
    r"(?:\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[/.-]\d{1,2}[/.-](?:\d{4}|\d{2})"
    rf"|{_MONTH}\.? {_DAY},? \d{{4}}|{_DAY} (?:of )?{_MONTH}\.?,? \d{{4}})"
)
_STREET_SUFFIX = (
    r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl|"
    r"Terrace|Ter|Circle|Cir|Parkway|Pkwy|Highway|Hwy|Square|Sq|Trail|Trl|Alley|Plaza)"
)
# Lower-case street names are accepted only before suffixes that are never a verb or a unit:
# "a 2 hour drive" and "3 times a day" must survive.
_LOWER_SUFFIX = r"(?:street|st|avenue|ave|road|rd|boulevard|blvd|lane|ln)"
_STATE = (
    r"(?:AL|AK|AZ|AR|CA|CO|CT|DE|DC|FL|GA|HI|ID|IL|IN|IA|KS|KY|LA|ME|MD|MA|MI|MN|MS|MO|MT|NE|"
    r"NV|NH|NJ|NM|NY|NC|ND|OH|OK|OR|PA|RI|SC|SD|TN|TX|UT|VT|VA|WA|WV|WI|WY|PR)"
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


# Card networks: number prefix and the lengths the network issues. A length the network does
# not issue is not its card, which keeps 13-digit product barcodes (EAN-13) out.
_CARD_NETWORKS: list[tuple[re.Pattern[str], frozenset[int]]] = [
    (re.compile(p), frozenset(lengths)) for p, lengths in (
        (r"4", (13, 16, 19)),  # Visa
        (r"5[1-5]|2(?:22[1-9]|2[3-9]\d|[3-6]\d\d|7[01]\d|720)", (16,)),  # Mastercard
        (r"3[47]", (15,)),  # Amex
        (r"6011|64[4-9]|65", (16, 19)),  # Discover
        (r"62|81", (16, 17, 18, 19)),  # UnionPay
        (r"35(?:2[89]|[3-8]\d)", (16, 19)),  # JCB
        (r"30[0-5]|3[689]", (14, 16, 19)),  # Diners
        (r"5[06-8]|6\d", (16, 19)),  # Maestro (its shorter numbers look like anything)
        (r"220[0-4]", (16, 17, 18, 19)),  # Mir
    )
]


def card_number(text: str) -> bool:
    digits = re.sub(r"[ -]", "", text)
    return any(prefix.match(digits) and len(digits) in lengths
               for prefix, lengths in _CARD_NETWORKS) and luhn_valid(digits)


def iban_valid(text: str) -> bool:
    """Registry length and format for the country, and mod 97 = 1 (stdnum)."""
    return bool(stdnum_iban.is_valid(text.replace(" ", "").replace("-", ""), check_country=False))


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def _ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text.split("%", 1)[0])
    except ValueError:
        return False
    return True


Finder = Callable[[str], Iterator[Span]]


@dataclass(frozen=True)
class Detector:
    """A pattern, a check a match must pass and the normal form its hash token is made from.

    A match with a ``pii`` group has only that group redacted (the keyword that gave the
    context stays). ``groups``: the candidate may run on into digits that are not part of it
    (a card's CVV, the next word of an IBAN); shorter prefixes, cut at a separator, are tried
    until one passes the check."""

    kind: str
    pattern: re.Pattern[str]
    check: Callable[[str], bool] | None = None
    normal: Callable[[str], str] = str
    groups: bool = False

    def __call__(self, text: str) -> Iterator[Span]:
        for match in self.pattern.finditer(text):
            group = "pii" if match.groupdict().get("pii") is not None else 0
            start, end = match.span(group)
            passing = self._passing_end(text, start, end)
            if passing is not None:
                yield Span(self.kind, start, passing, self.normal(text[start:passing]))

    def _passing_end(self, text: str, start: int, end: int) -> int | None:
        if self.check is None:
            return end
        ends = [end]
        if self.groups:
            ends += [start + i for i in range(end - start - 1, 0, -1)
                     if text[start + i] in " -" and text[start + i - 1] not in " -"]
        for candidate in ends:
            if self.check(text[start:candidate]):
                return candidate
        return None


_IPV4_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_VERSION_BEFORE = re.compile(r"(?i)(?:version|ver\.?|build|release|firmware|software|v)\s*$")


def _find_ip(text: str) -> Iterator[Span]:
    for match in _IP.finditer(text):
        found = match.group(0)
        if match.group("v4") is not None:
            if _VERSION_BEFORE.search(text[max(0, match.start() - 10) : match.start()]):
                continue
        elif not _ipv6(found):
            continue
        yield Span("IP", match.start(), match.end(), found.lower())


_IP = re.compile(
    rf"(?P<v4>(?<![\w.])(?:{_IPV4_OCTET}\.){{3}}{_IPV4_OCTET}(?![\w]|\.\d))"
    r"|(?<![\w:.])(?=[0-9A-Fa-f:]*:[0-9A-Fa-f:]*:)(?:[0-9A-Fa-f]{0,4}:){2,7}"
    r"(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?:%[\w.]+)?(?![\w:]|\.\d)"
)

# Phone numbers. "00" as an international prefix is read as "+" (same length, so offsets hold).
_IDD_00 = re.compile(r"(?<![\w+.,])00(?=[1-9]\d)")
_PHONE_KEYWORDS = (
    r"tel(?:ephone|efon|éfono|efono)?|t[ée]l[ée]phone|tél|phone|ph|mobile?|mob|cell"
    r"(?:phone|ulare)?|fax|call(?:ed)?|contact|reach(?:able)?(?: at)?|whatsapp|sms|handy"
    r"|móvil|portable"
)
_PHONE_KEYWORD = re.compile(
    rf"(?i)\b(?:{_PHONE_KEYWORDS})\b\.?\s*(?:(?:is|at|on|number|no\.?|nr\.?|#)\s*)?:?\s*"
)
# National layouts tried after a phone keyword, in this order; internationally written numbers
# need no list (their country code says where they belong).
PHONE_REGIONS = ("US", "GB", "DE", "FR", "ES", "IT", "NL", "CH", "AU", "IN", "JP", "BR", "MX",
                 "IE", "BE", "AT", "SE", "CA")
_LENIENCY = phonenumbers.Leniency.VALID


def _e164(number: phonenumbers.PhoneNumber) -> str:
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


# In ASCII text (where case-insensitive matching is ASCII case folding) every phone keyword
# holds one of these, lower-cased; a text without any is spared the keyword scan, which tries
# its case-insensitive alternation at every word boundary.
_PHONE_KEYWORD_STEMS = ("tel", "ph", "mob", "cell", "fax", "call", "contact", "reach",
                        "whatsapp", "sms", "handy", "portable")


def _keyword_ends(text: str) -> set[int]:
    """Where each phone keyword (with its "is", "no.", ":" …) ends."""
    if text.isascii():
        lowered = text.lower()
        if not any(stem in lowered for stem in _PHONE_KEYWORD_STEMS):
            return set()
    return {m.end() for m in _PHONE_KEYWORD.finditer(text)}


# A stretch that could hold a phone number: seven digits or more, with the separators numbers
# are written with. Shorter runs ("80", "12.5", a lab table's values) never reach the matcher,
# which is slow (it parses every digit run it meets); digits and separators are disjoint, so the
# pattern cannot backtrack.
_PHONE_STRETCH = re.compile(r"[+(]?\d(?:[ \t().\-/]*\d){6,}")
# What a text holds wherever ``_phone_windows`` gives a window that no keyword opened: a stretch
# that opens with "+", or with "00" (read as "+"), or a North-American shape. A tab may be
# written ``\t`` (in a trace's JSON).
_TAB = r"(?:\t|\\t)"
_SEP = r"(?:[ \t().\-/]|\\t)"
_PHONE_WINDOW_NEEDS = [
    rf"\+\d(?:{_SEP}*\d){{6,}}",
    rf"00\d(?:{_SEP}*\d){{6,}}",
    # Two patterns, not one alternation: each opens with a literal or a digit, where sre
    # starts quickly on the text that is not ASCII.
    rf"\(\d\d\d\)(?: |{_TAB})?\d\d\d(?:[ .-]|{_TAB})\d\d\d\d",
    rf"\d\d\d(?:[ .-]|{_TAB})\d\d\d(?:[ .-]|{_TAB})\d\d\d\d",
]
_NANP_SHAPE = re.compile(r"(?<!\d)(?:1[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?!\d)")
_DATE_ONLY = re.compile(r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}")


def _digit_count(text: str) -> int:
    """How many characters of ``text`` are digits (``str.isdigit``), counted in C when the
    text is ASCII (where only 0-9 are)."""
    if text.isascii():
        return sum(map(text.count, "0123456789"))
    return sum(ch.isdigit() for ch in text)


def _phone_windows(probe: str, keyword_ends: set[int]) -> list[tuple[int, int]]:
    """Where the matcher should look: stretches written like a phone number — with a ``+``, in
    the North-American shape, or right after a phone keyword. A table of plain digit groups
    would otherwise have every group parsed (seconds for a long message)."""
    windows: list[tuple[int, int]] = []
    for m in _PHONE_STRETCH.finditer(probe):
        stretch = m.group()
        if _DATE_ONLY.fullmatch(stretch):
            continue
        if "+" not in stretch and not _NANP_SHAPE.search(stretch) and m.start() not in keyword_ends:
            continue
        # One character before, so the matcher sees a letter glued to the digits ("NCT0…"),
        # and room after for an extension ("ext. 204").
        start, end = max(0, m.start() - 1), min(len(probe), m.end() + 16)
        if windows and start <= windows[-1][1]:
            windows[-1] = (windows[-1][0], end)
        else:
            windows.append((start, end))
    return windows


def _find_phone(text: str) -> Iterator[Span]:
    if _digit_count(text) < 7:
        return
    keyword_ends = _keyword_ends(text)
    seen: list[tuple[int, int]] = []
    probe = _IDD_00.sub(" +", text) if "00" in text else text
    matches = ((a, m) for a, b in _phone_windows(probe, keyword_ends)
               for m in phonenumbers.PhoneNumberMatcher(probe[a:b], "US", leniency=_LENIENCY))
    for offset, m in matches:
        start, end = offset + m.start, offset + m.end
        if seen and start < seen[-1][1]:  # matches arrive in text order
            continue
        if probe[start] == "+" and text[start] == "0":
            start -= 1  # written "00…": the prefix goes with the number
        separated = re.search(r"[\s().-]", m.raw_string) is not None
        if "+" not in m.raw_string and not separated and start not in keyword_ends:
            # An unbroken 10-digit run is as often an accession or an order number.
            continue
        if text[start] == "(" and ")" not in text[start:end]:
            start += 1  # "(212-555-0198)": the bracket belongs to the sentence
        seen.append((start, end))
        yield Span("PHONE", start, end, _e164(m.number))
    taken = sorted(seen)
    for kw_end in sorted(keyword_ends):
        i = bisect.bisect_right(taken, (kw_end, len(text)))
        if i and kw_end < taken[i - 1][1]:  # the keyword ends inside a number already found
            continue
        window = text[kw_end : kw_end + 32]
        if not window[:1].isdigit() and window[:1] != "(":
            continue
        for region in PHONE_REGIONS:
            match = next(iter(phonenumbers.PhoneNumberMatcher(window, region,
                                                              leniency=_LENIENCY)), None)
            if match is not None and match.start == 0:
                start, end = kw_end, kw_end + match.end
                i = bisect.bisect_left(taken, (start, 0))
                clear = (i == len(taken) or end <= taken[i][0]) and (
                    i == 0 or taken[i - 1][1] <= start)
                if clear:
                    taken.insert(i, (start, end))
                    yield Span("PHONE", start, end, _e164(match.number))
                break


DETECTORS: dict[str, Finder] = {
    "EMAIL": Detector("EMAIL", re.compile(
        r"(?<![\w.%+'-])[A-Za-z0-9._%+-]+(?:'[A-Za-z0-9._%+-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
    ), normal=str.lower),
    "IBAN": Detector("IBAN", re.compile(
        r"\b[A-Z]{2}\d{2}(?:[ -]?[A-Z0-9]{4}){2,7}(?:[ -]?[A-Z0-9]{1,4})?\b"
    ), iban_valid, lambda s: re.sub(r"[ -]", "", s).upper(), groups=True),
    "CARD": Detector("CARD", re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,22}(?![\w-])"),
                     card_number, _digits, groups=True),
    "SSN": Detector("SSN", re.compile(
        r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b"
        r"|(?i:\b(?:SSN|social security(?: number| no\.?| #)?|SS#|SS no\.?))\s*(?:is|:|#|-|no\.?)?"
        r"\s*(?P<pii>(?!000|666|9\d\d)\d{3}(?P<sep>[ -]?)(?!00)\d{2}(?P=sep)(?!0000)\d{4})\b"
    ), normal=_digits),
    "MRN": Detector("MRN", re.compile(
        r"(?i:\b(?:MRN|medical record(?: number| no\.?| #)?|med(?:ical)? rec(?:ord)?(?: no\.?| #)?"
        r"|record #|patient id|patient number|chart(?: number| no\.?| #)|hospital (?:number|no\.?)"
        r"|NHS (?:number|no\.?)|Krankenakte|dossier)(?![A-Za-z]))\s*(?:is|:|#|no\.?|=)?\s*#?\s*"
        r"(?P<pii>[A-Z]{0,3}-?\d{5,10}|\d{3} \d{3} \d{4})\b"
    ), normal=lambda s: re.sub(r"[ -]", "", s).upper()),
    "DOB": Detector("DOB", re.compile(
        r"(?i:\b(?:DOB|D\.O\.B\.?|date of birth|birth ?date|born(?: on)?|b\.|geb(?:oren)?\.?(?: am)?"
        r"|Geburtsdatum|née?(?: le)?|date de naissance|fecha de nacimiento|nacid[oa](?: el)?"
        r"|data di nascita|nat[oa](?: il)?))\s*[:\-]?\s*"
        rf"(?P<pii>(?i:{_DATE}))"
    )),
    "IP": _find_ip,
    "PHONE": _find_phone,
    "ADDRESS": Detector("ADDRESS", re.compile(
        r"\b\d{1,6}[A-Z]?(?:-\d{1,4})?(?: (?:[NSEW]|N[EW]|S[EW])\.?| North| South| East| West)?"
        rf"(?:(?: (?:[A-Z][a-z]+|[A-Z][a-z]*\.?|\d{{1,3}}(?:st|nd|rd|th))){{1,4}} {_STREET_SUFFIX}"
        rf"|(?: [a-z]+){{1,2}} {_LOWER_SUFFIX})\b\.?"
        r"(?: (?:N[EW]?|S[EW]?|E|W)\b\.?)?"
        r"(?:,? (?:Apt|Apartment|Suite|Ste|Unit|Fl|Floor|Rm|Room|#)\.? ?#?[A-Za-z0-9-]+)?"
        rf"(?:,? [A-Z][a-z]+(?: [A-Z][a-z]+){{0,2}},? {_STATE}(?: \d{{5}}(?:-\d{{4}})?)?\b)?"
        r"|\bP\.? ?O\.? Box \d{1,6}\b"
    )),
}
DEFAULT_KINDS = tuple(DETECTORS)


@dataclass(frozen=True)
class Needs:
    """What a detector's pattern cannot match without: ``patterns``, a few short ones implied
    by it (one of them must match); ``stems``, words one of which an ASCII text also holds,
    in any case, wherever the detector's case-insensitive keyword matches. A text that fails
    them is skipped, which is exact: the detector would find nothing there
    (``test_redaction.py`` compares ``find_spans`` with and without them on the PII corpus and
    on random text). The detectors open with lookbehinds and word boundaries, so sre tries them
    at every position; most clinical text has digits, so ``_MAYBE_PII`` alone lets nearly every
    string through.

    On ASCII text every detector's needs are read in one pass (``AsciiNeeds``); other text,
    and text in which a finding is already hidden, is searched with ``patterns`` one by one."""

    patterns: tuple[re.Pattern[str], ...]
    stems: tuple[bytes, ...] = ()


def _needs(patterns: list[str], stems: tuple[bytes, ...] = ()) -> Needs:
    return Needs(tuple(re.compile(p) for p in patterns), stems)


# A keyword opens the phone search only where what follows it (its "is", "no.", ":" and
# whitespace, as ``_PHONE_KEYWORD`` reads them) is where a number opens: a digit, "(" or "+"
# (and, in text that is not ASCII, any other character, since ``str.isdigit`` holds for more
# than ``\d``); "squamous cell carcinoma" needs no phone search. Read on a trace's JSON too,
# where a string's control characters are escapes ("\\n", "\\u001c"): the whitespace class
# takes them, and the keyword's leading word boundary is left out, since in "\\ntel" the
# escape's letter runs into it.
_JSON_SPACE = r"(?:[\s\x1c-\x1f]|\\[ntrf]|\\u00[01][0-9a-fA-F])"
_PHONE_KEYWORD_NEED = (
    rf"(?i)(?:{_PHONE_KEYWORDS})\b\.?{_JSON_SPACE}*(?:(?:is|at|on|number|no\.?|nr\.?|#)"
    rf"{_JSON_SPACE}*)?:?{_JSON_SPACE}*(?:[0-9(+]|[^\x00-\x7f])"
)


NEEDS: dict[str, Needs] = {
    "EMAIL": _needs([r"@"]),
    "IBAN": _needs([r"[A-Z]{2}\d\d"]),
    "CARD": _needs([r"\d(?:[ -]?\d){12}"]),
    # Both layouts, with a keyword or without.
    "SSN": _needs([r"\d\d\d[ -]?\d\d[ -]?\d\d\d\d"]),
    # Every keyword holds one of the stems ("medical record", "med rec", "NHS no.").
    "MRN": _needs([r"\d\d\d\d\d", r"\d\d\d \d\d\d \d\d\d\d"],
                  (b"mrn", b"med", b"record", b"patient", b"chart", b"hospital", b"nhs",
                   b"krankenakte", b"dossier")),
    # Numeric dates; a named month's year. Keywords: "née" is not ASCII, "nat[oa]" holds "nat".
    "DOB": _needs([r"\d[-/.]\d\d?[-/.]\d", r"\d\d\d\d"],
                  (b"dob", b"d.o.b", b"birth", b"born", b"b.", b"geb", b"naissance",
                   b"nacimiento", b"nacid", b"nascita", b"nat")),
    "IP": _needs([r":[0-9A-Fa-f]{0,4}:", r"\d\.\d{1,3}\.\d{1,3}\.\d"]),
    # A stretch the matcher is shown (``_PHONE_WINDOW_NEEDS``), or a phone keyword that a
    # number could follow (``_PHONE_KEYWORD_NEED``).
    "PHONE": _needs([*_PHONE_WINDOW_NEEDS, _PHONE_KEYWORD_NEED]),
    # A house number, one to five words (a direction, the street's name) and a street suffix;
    # or a PO box.
    "ADDRESS": _needs(
        [rf"\d[A-Z]?(?: [A-Za-z0-9.]+){{1,5}} (?:{_STREET_SUFFIX}|{_LOWER_SUFFIX})\b", r"Box \d"]),
}


class AsciiNeeds:
    """Every detector's needs in one ``PatternSet``: one pass over an ASCII text says which
    detectors may find something there, where sre made a pass per pattern (~4 against ~22 µs
    for an 860-byte clinical trace's JSON). On ASCII text the two engines read these patterns
    alike (``test_redaction.py`` compares them on random text)."""

    def __init__(self, needs: dict[str, Needs]) -> None:
        # Ids: 2k for detector k's patterns (any one), 2k + 1 for its stems (any case).
        patterns: list[Pattern] = []
        for k, detector_needs in enumerate(needs.values()):
            patterns += [Pattern(2 * k, p.pattern.encode()) for p in detector_needs.patterns]
            if detector_needs.stems:
                patterns.append(Pattern(2 * k + 1, b"|".join(map(re.escape, detector_needs.stems)),
                                        caseless=True))
        self._kinds = [(kind, 2 * k, 2 * k + 1 if n.stems else None)
                       for k, (kind, n) in enumerate(needs.items())]
        # UTF-8: the phone keyword holds a few accented letters; ASCII text is valid UTF-8.
        self._patterns = PatternSet(patterns, utf8=True)

    def met(self, text: bytes) -> set[str]:
        """The detectors whose needs ``text`` (ASCII) meets."""
        hits = self._patterns.matched(text)
        return {kind for kind, patterns, stems in self._kinds
                if patterns in hits and (stems is None or stems in hits)}


_ascii_needs = AsciiNeeds(NEEDS)  # compiled at its first scan


def _met_needs(text: str) -> set[str] | None:
    """The detectors whose needs ``text`` meets, when it is ASCII; None otherwise."""
    return _ascii_needs.met(text.encode("ascii")) if text.isascii() else None


def _may_find(kind: str, needs: Needs, work: str, met: set[str] | None) -> bool:
    """Whether the detector ``kind`` with ``needs`` can find anything in ``work``; ``met``: the
    detectors whose needs ``work`` meets, read in one pass when it is ASCII."""
    if met is not None:
        return kind in met
    return any(pattern.search(work) for pattern in needs.patterns)


def possible_kinds(serialized: str, kinds: tuple[str, ...] = DEFAULT_KINDS) -> tuple[str, ...]:
    """The detectors of ``kinds`` that may find something in a value whose strings all appear
    in ``serialized``, its JSON: escaping touches only quotes, backslashes and control
    characters, which no need reads, so a need one string meets is met here too (keys and
    numbers can only add false alarms, never hide a finding). A trace's needs are checked once
    this way instead of once per string; detectors without needs always stay."""
    if not _MAYBE_PII.search(serialized):
        return ()
    met = _met_needs(serialized)
    if met is not None:  # most traces: one pass said it all
        return tuple([kind for kind in kinds if kind in met or kind not in NEEDS])
    possible = []
    for kind in kinds:
        needs = NEEDS.get(kind)
        if needs is None or _may_find(kind, needs, serialized, met):
            possible.append(kind)
    return tuple(possible)


# Every detector needs a digit or an "@": one cheap search lets most short strings (metadata
# leaves, answers) skip the scans.
_MAYBE_PII = re.compile(r"[0-9@]")
# What a claimed span is overwritten with while later detectors run: not a word character, not
# a digit, not a separator any pattern reads, so nothing can match across or into it.
_HIDDEN = "\ue000"


def find_spans(text: str, kinds: tuple[str, ...] = DEFAULT_KINDS) -> list[Span]:
    """Every finding in ``text``, in text order; detectors earlier in ``kinds`` win overlaps."""
    if not _MAYBE_PII.search(text):
        return []
    work = text
    met = _met_needs(text)  # None once a finding is hidden (``_HIDDEN`` is not ASCII)
    spans: list[Span] = []
    for kind in kinds:
        needs = NEEDS.get(kind)
        if needs is not None and not _may_find(kind, needs, work, met):
            continue
        found = sorted((s for s in DETECTORS[kind](work) if _HIDDEN not in work[s.start : s.end]),
                       key=lambda s: s.start)
        if found:
            spans += found
            work = splice(work, found, lambda s: _HIDDEN * (s.end - s.start))
            met = None
    return sorted(spans, key=lambda s: s.start)


def splice(text: str, spans: list[Span], replacement: Callable[[Span], str]) -> str:
    """``text`` with each span (in order, not overlapping) replaced, in one pass: a long text
    with thousands of findings must not be copied once per finding."""
    pieces, at = [], 0
    for span in spans:
        pieces += [text[at : span.start], replacement(span)]
        at = span.end
    pieces.append(text[at:])
    return "".join(pieces)


def hash_key(secret: str, tenant: str) -> bytes:
    """The tenant's token key: tokens match within a tenant and never across tenants."""
    return hmac.new(secret.encode(), f"pii-token\x00{tenant}".encode(), hashlib.sha256).digest()


def token(key: bytes, kind: str, value: str) -> str:
    digest = hmac.new(key, f"{kind}\x00{value}".encode(), hashlib.sha256).hexdigest()
    return f"[{kind}:{digest[:12]}]"


@dataclass
class Redactor:
    """Redacts text in ``mode``; ``key`` (from ``hash_key``) is needed for ``hash``."""

    kinds: tuple[str, ...] = DEFAULT_KINDS
    counts: Counter[str] = field(default_factory=Counter)
    mode: RedactionMode = RedactionMode.mask
    key: bytes | None = None

    def __post_init__(self) -> None:
        if self.mode is RedactionMode.hash and self.key is None:
            raise ValueError("hash mode needs a key")

    @classmethod
    def for_mode(cls, mode: RedactionMode, key: bytes | None) -> Redactor | None:
        """A redactor in ``mode`` with every detector, None for ``off``; ``key`` is used only
        in ``hash`` mode, which needs it."""
        if mode is RedactionMode.off:
            return None
        return cls(mode=mode, key=key if mode is RedactionMode.hash else None)

    def placeholder(self, span: Span) -> str:
        if self.mode is RedactionMode.hash:
            assert self.key is not None
            return token(self.key, span.kind, span.value)
        return f"[{span.kind}]"

    def text(self, value: str) -> str:
        if self.mode is RedactionMode.off:
            return value
        spans = find_spans(value, self.kinds)
        if not spans:  # most strings: nothing to count, nothing to copy
            return value
        self.counts.update(s.kind for s in spans)
        return splice(value, spans, self.placeholder)

    def narrow_to(self, value: Any) -> bool:
        """Keep only the detectors that may find something in ``value`` (a whole trace: its
        messages, response and metadata), checked once on its JSON instead of once per string
        (``possible_kinds``); whether any is left to run. orjson keeps non-ASCII as it is (an
        escaped digit would hide from ``\\d``); a value it refuses (an integer beyond 64 bits)
        keeps every detector."""
        if self.mode is RedactionMode.off:
            return False
        try:
            serialized = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
        except TypeError:
            return bool(self.kinds)
        self.kinds = possible_kinds(serialized, self.kinds)
        return bool(self.kinds)

    def finds(self, value: str) -> list[str]:
        """The kinds of PII in ``value``, without counting them."""
        return sorted({s.kind for s in find_spans(value, self.kinds)})

    def finds_each(self, values: Sequence[str]) -> list[list[str]]:
        """``finds`` of each of ``values``, the detectors narrowed once on all of them joined
        by newlines: a need met in one value is met in the joined text (a newline reads as a
        string's edge to every ``\\b``), so a batch of opaque ids costs one check, not one per
        id."""
        kinds = possible_kinds("\n".join(values), self.kinds) if self.kinds else ()
        if not kinds:
            return [[] for _ in values]
        narrowed = Redactor(kinds=kinds)
        return [narrowed.finds(v) for v in values]

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
