"""PII detectors on hand-written inputs: what each must redact, and the near-misses it must
leave alone (random digit runs, clinical numbers, dates of therapy, versions, times)."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from unittest.mock import patch

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.traces import redaction
from app.traces.redaction import (
    RedactionMode,
    Redactor,
    Span,
    find_spans,
    hash_key,
    iban_valid,
    luhn_valid,
    token,
)
from benchmarks.pii import load_corpus

REDACTED = [
    # cards: every common layout, checked with Luhn
    ("card 4111 1111 1111 1111 on file", "card [CARD] on file", "CARD"),
    ("4111-1111-1111-1111", "[CARD]", "CARD"),
    ("paid with 4111111111111111.", "paid with [CARD].", "CARD"),
    ("amex 378282246310005", "amex [CARD]", "CARD"),
    ("amex 3782 822463 10005", "amex [CARD]", "CARD"),
    ("mc 5555 5555 5555 4444", "mc [CARD]", "CARD"),
    ("mc 2223003122003222", "mc [CARD]", "CARD"),
    ("card 4111 1111 1111 1111 123", "card [CARD] 123", "CARD"),  # the CVV run on stays
    ("IBAN DE89 3704 0044 0532 0130 00 1234", "IBAN [IBAN] 1234", "IBAN"),
    # IBANs, checked with mod 97
    ("IBAN GB82 WEST 1234 5698 7654 32", "IBAN [IBAN]", "IBAN"),
    ("to DE89370400440532013000 now", "to [IBAN] now", "IBAN"),
    ("FR14 2004 1010 0505 0001 3M02 606", "[IBAN]", "IBAN"),
    # SSNs: dashed anywhere, spaced or unbroken after a keyword
    ("SSN 123-45-6789", "SSN [SSN]", "SSN"),
    ("SSN 123 45 6789", "SSN [SSN]", "SSN"),
    ("ssn: 123456789", "ssn: [SSN]", "SSN"),
    ("Social Security number 123 45 6789.", "Social Security number [SSN].", "SSN"),
    # phones, North-American and international
    ("call (617) 555-0142", "call [PHONE]", "PHONE"),
    ("call +1 617 555 0142", "call [PHONE]", "PHONE"),
    ("call +44 20 7946 0958 today", "call [PHONE] today", "PHONE"),
    ("Tel. +33 1 42 68 53 00", "Tel. [PHONE]", "PHONE"),
    ("tel 0049 30 123456", "tel [PHONE]", "PHONE"),
    # IP addresses
    ("from 192.168.1.20 at noon", "from [IP] at noon", "IP"),
    ("host 2001:db8::1 and fe80::1", "host [IP] and [IP]", "IP"),
    # US street addresses
    ("lives at 1600 Pennsylvania Ave, Apt 4B with", "lives at [ADDRESS] with", "ADDRESS"),
    ("123 Main Street", "[ADDRESS]", "ADDRESS"),
    ("350 Fifth Avenue", "[ADDRESS]", "ADDRESS"),
    ("42 W 57th St", "[ADDRESS]", "ADDRESS"),
]

KEPT = [
    "random 4111111111111112",  # Luhn fails
    "order 1234567890123456",  # no card network starts with 1
    "accession 9780306406157",  # an ISBN: 13 digits, no card prefix
    "EAN 5012345678908",  # passes Luhn, Maestro's prefix, but 13 digits: no network issues that
    "GB82 WEST 1234 5698 7654 33",  # IBAN checksum fails
    "lot 123456789",  # nine digits without an SSN keyword
    "code 123 45 6789",  # the SSN layout without its keyword
    "dose +5 mg, +20 %",
    "version 1.2.3.4.5 of 10.0.0",
    "at 10:30:00, ratio 3:1",
    "5 mg daily",
    "Dr. Smith saw 2 patients",
    "ECOG 1, stage IV NSCLC, PD-L1 80%",
    "Hb 12.5 g/dL, dose 75 mg/m2 on 2024-03-01",
    "PFS 180 days after 2 cycles (C1D1 2023-11-05)",
    "Started osimertinib 80 mg on 03/14/2023",
    "weight 72.5 kg, BP 120/80, HR 72",
]


@pytest.mark.parametrize(("text", "expected", "kind"), REDACTED)
def test_pii_is_replaced_by_its_kind(text: str, expected: str, kind: str) -> None:
    r = Redactor()
    assert r.text(text) == expected
    assert r.counts == {kind: expected.count(f"[{kind}]")}


@pytest.mark.parametrize("text", KEPT)
def test_near_misses_are_kept(text: str) -> None:
    r = Redactor()
    assert r.text(text) == text
    assert not r.counts


def test_checksums_on_known_values() -> None:
    assert luhn_valid("79927398713") and not luhn_valid("79927398710")
    assert iban_valid("GB82WEST12345698765432") and not iban_valid("GB82WEST12345698765433")


def test_finds_names_the_kinds_without_rewriting() -> None:
    assert Redactor().finds("user-jane@example.org") == ["EMAIL"]
    assert Redactor().finds("req-8f3a2c") == []


def test_hash_tokens_are_one_per_value_whatever_its_layout() -> None:
    key = hash_key("secret", "tenant-a")
    r = Redactor(mode=RedactionMode.hash, key=key)
    spaced = r.text("card 4111 1111 1111 1111, call +1 617 555 0142, Jane.Doe@Example.org")
    dashed = r.text("card 4111-1111-1111-1111, call (617) 555-0142, jane.doe@example.org")
    assert spaced == dashed
    assert spaced == (f"card {token(key, 'CARD', '4111111111111111')}, call "
                      f"{token(key, 'PHONE', '+16175550142')}, "
                      f"{token(key, 'EMAIL', 'jane.doe@example.org')}")
    assert re.fullmatch(r"\[CARD:[0-9a-f]{12}\]", token(key, "CARD", "4111111111111111"))
    assert r.counts == {"CARD": 2, "PHONE": 2, "EMAIL": 2}


def test_hash_tokens_differ_between_tenants_and_between_values() -> None:
    a, b = hash_key("secret", "tenant-a"), hash_key("secret", "tenant-b")
    assert token(a, "EMAIL", "x@example.org") != token(b, "EMAIL", "x@example.org")
    assert token(a, "EMAIL", "x@example.org") != token(a, "EMAIL", "y@example.org")
    assert hash_key("other", "tenant-a") != a


def test_off_stores_text_as_sent_and_hash_needs_a_key() -> None:
    r = Redactor(mode=RedactionMode.off)
    assert r.text("SSN 123-45-6789") == "SSN 123-45-6789" and not r.counts
    with pytest.raises(ValueError):
        Redactor(mode=RedactionMode.hash)


def test_spans_keep_the_keyword_that_gave_the_context() -> None:
    text = "DOB: 03/14/1957, MRN: 00482913"
    assert [(s.kind, text[s.start:s.end]) for s in find_spans(text)] == [
        ("DOB", "03/14/1957"), ("MRN", "00482913")]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)
       | st.from_regex(r"[ +()0-9.:@a-fA-F/-]{0,60}", fullmatch=True))
def test_any_text_gives_ordered_spans_inside_it_and_redacts_without_error(text: str) -> None:
    spans = find_spans(text)
    for a, b in pairwise(spans):
        assert a.end <= b.start
    assert all(0 <= s.start < s.end <= len(text) for s in spans)
    Redactor(mode=RedactionMode.hash, key=b"k").text(text)


# The cheap prechecks (``NEEDS``) only decide which detectors run: every text must give the
# spans it gives with every detector run on it.
_FRAGMENTS = [
    "0", "1", "4", "9", "12", "123", "1234", "00", "0049", "555", " ", "  ", "\t", "-", ".", "/",
    ":",
    "::", "(", ")", "+", "#", "@", "a@b.co", "ex.com", ",", "\n", "²", "٣", "GB", "DE", "NL",
    "AB", "fe80", "Street", "St", "ave", "Rd", "Box ", "P.O. ", "Main", "Apt 4", "SSN ", "SS# ",
    "social security ", "MRN ", "patient id ", "DOB ", "born ", "né le ", "Jan", "March",
    "12th", "of ", "tel ", "Tel. ", "phone: ", "call ", "fax ", "version ", "Hb ", "mg ",
    "Medical Record # ", "med rec no. ", "NHS no. ", "Chart # ", "KRANKENAKTE ", "Dossier: ",
    "D.O.B. ", "Birthdate ", "BORN ON ", "b. ", "geb. am ", "Geburtsdatum: ", "NATA IL ",
    "fecha de nacimiento ", "nacida el ", "data di nascita ", "date de naissance ", "née ",
    "1957", "03/14/", "14.03.", "A12345", "12345",
]


def _without_prechecks(text: str) -> list[Span]:
    with patch.dict(redaction.NEEDS, clear=True):
        return find_spans(text)


def _corpus_texts() -> list[str]:
    return [str(item["text"]) for item in load_corpus()] + [
        text for text, *_ in REDACTED] + list(KEPT)


def test_prechecks_skip_no_finding_in_the_corpus_or_the_hand_written_cases() -> None:
    for text in _corpus_texts():
        assert find_spans(text) == _without_prechecks(text), text


@settings(max_examples=1500, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=40).map("".join)
       | st.from_regex(r"[ +()0-9.:@a-fA-F/#-]{0,60}", fullmatch=True))
def test_prechecks_skip_no_finding_in_random_text(text: str) -> None:
    assert find_spans(text) == _without_prechecks(text)


def test_each_precheck_is_needed_by_its_detector_on_the_corpus() -> None:
    for text in _corpus_texts():
        for kind, needs in redaction.NEEDS.items():
            if list(redaction.DETECTORS[kind](text)):
                assert any(p.search(text) for p in needs.patterns), (kind, text)
                if text.isascii() and needs.stems:
                    assert any(stem in text.lower().encode() for stem in needs.stems), (kind, text)


def test_the_phone_need_passes_over_opaque_ids_and_clinical_numbers() -> None:
    """A digit run is not enough to run the phone search: it needs a "+", an international
    "00", a North-American shape or a keyword."""
    for text in ["clin-train-s0-000000", "order 1234567", "LDH 230 U/L, Hb 11.8 g/dL"]:
        assert "PHONE" not in redaction.possible_kinds(text), text
    for text in ["+44 20 7946 0958", "0049 30 901820", "(617) 555-0142", "617.555.0142",
                 "Tel 0151 23456789", "fax:0612345678"]:
        assert "PHONE" in redaction.possible_kinds(text), text
    # In a trace's JSON a tab is written "\\t": a number split by one still counts.
    for text in ["+44\t20 7946 0958", "(617)\t555-0142", "617\t555\t0142"]:
        assert "PHONE" in redaction.possible_kinds(orjson.dumps([text]).decode()), text


_KEYWORD_FRAGMENTS = [
    "tel", "TEL", "Tel.", "telephone", "téléphone", "Telefon", "phone", "PH", "Mobile", "mob",
    "cell", "Cellulare", "fax", "called", "Contact", "reachable at", "WhatsApp", "SMS", "ſms",
    "Handy", "móvil", "portable", "hotel", "lymphoma", " ", ": ", "is ", "no. ", "#", "5", "0",
    "(", "x", "é",
]


def _sre_met(text: str) -> set[str]:
    """The needs met, read the slow way: each pattern by sre, the stems as substrings."""
    lowered = text.lower().encode()
    return {kind for kind, needs in redaction.NEEDS.items()
            if any(p.search(text) for p in needs.patterns)
            and (not needs.stems or any(stem in lowered for stem in needs.stems))}


@settings(max_examples=1500, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(_FRAGMENTS + _KEYWORD_FRAGMENTS), max_size=40).map("".join)
       | st.from_regex(r"[ +()0-9.:@a-zA-Z/#\\\t\n-]{0,60}", fullmatch=True))
def test_the_one_pass_needs_agree_with_sre_on_ascii_text(text: str) -> None:
    if not text.isascii():
        return
    assert redaction._ascii_needs.met(text.encode()) == _sre_met(text), text


# Numbers valid after a keyword in some region, so that random text finds phones.
_JSON_FRAGMENTS = _FRAGMENTS + _KEYWORD_FRAGMENTS + [
    "\x1c", "\x0b", "\r", "n", "t", "\ntel ", "0151 23456789", "(030) 901820", "020 7946 0958",
    "+44 20 7946 0958"]


@settings(max_examples=2000, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(_JSON_FRAGMENTS), max_size=30).map("".join))
def test_a_trace_s_json_meets_the_needs_of_every_finding_in_its_strings(text: str) -> None:
    """``possible_kinds`` reads a trace's JSON, where a string's control characters are escapes
    ("\\n" runs its letter into the next word): a kind found in a string is still possible."""
    found = {s.kind for s in find_spans(text)}
    for value in ([text], {"metadata": {"note": text}}):
        serialized = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
        assert found <= set(redaction.possible_kinds(serialized)), (text, serialized)


def test_a_phone_keyword_needs_a_number_after_it() -> None:
    """"Squamous cell carcinoma" (a keyword, and digits elsewhere) opens no phone search; a
    keyword before a number does, across a newline written as JSON's escape too."""
    assert "PHONE" not in redaction.possible_kinds("squamous cell carcinoma, T2 N0, 4.5 cm")
    # "über": text that is not ASCII, read by sre, which missed the keyword after "\\n" before.
    for text in ["cell 0151 23456789", "Notes:\ntel 0151 23456789", "Tel.:\n(030) 901820",
                 "reachable at\t+49 30 901820", "Notizen über:\ntel 0151 23456789"]:
        assert "PHONE" in redaction.possible_kinds(orjson.dumps([text]).decode()), text
        assert "PHONE" in redaction.possible_kinds(text), text


def test_the_one_pass_needs_read_each_detector_apart() -> None:
    """One scan answers for every detector at once; each is met or not on its own."""
    met = redaction._ascii_needs.met
    assert met(b"no digits here") == set()
    assert met(b"write to a@b.co") == {"EMAIL"}
    assert met(b"patient 12345") == {"MRN"}  # four digits, but no birth keyword
    assert met(b"PATIENT 12345 at 10.0.0.1") == {"MRN", "IP"}  # any case
    assert met(b"12345") == set()  # a number without any record keyword: no MRN, no DOB
    assert met(b"Tel 0151") == {"PHONE"}  # the keyword alone opens the phone search
    assert met(b"12 Main Street") == {"ADDRESS"}


def test_the_one_pass_needs_serve_several_threads() -> None:
    """A scratch space serves one scan at a time: threads scanning at once each get their own."""
    texts = [f"call 555-0{i:03d} or mail u{i}@x.org".encode() for i in range(400)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(redaction._ascii_needs.met, texts))
    assert results == [{"PHONE", "EMAIL"}] * 400


@settings(max_examples=1500, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(_KEYWORD_FRAGMENTS), max_size=12).map("".join))
def test_the_phone_keyword_stem_check_skips_no_keyword(text: str) -> None:
    assert redaction._keyword_ends(text) == {
        m.end() for m in redaction._PHONE_KEYWORD.finditer(text)}


def test_finds_each_names_what_finds_names_for_every_value_of_a_batch() -> None:
    texts = _corpus_texts()
    redactor = Redactor()
    assert redactor.finds_each(texts) == [redactor.finds(t) for t in texts]
    assert redactor.finds_each(["order-7781", "a3f9c2", ""]) == [[], [], []]
    assert redactor.finds_each(["ok", "jane.doe@example.com"]) == [[], ["EMAIL"]]


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.lists(st.lists(st.sampled_from(_FRAGMENTS), max_size=12).map("".join), max_size=6))
def test_finds_each_of_random_ids_agrees_with_finds_one_by_one(values: list[str]) -> None:
    redactor = Redactor()
    assert redactor.finds_each(values) == [redactor.finds(v) for v in values]
