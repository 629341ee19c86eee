"""The labelled PII corpus and the precision/recall of the redaction detectors on it.

    python -m benchmarks.pii corpus    # (re)write tests/domain/traces/pii_corpus.jsonl
    python -m benchmarks.pii report    # score the detectors, write docs/pii.md

The corpus is generated here, deterministically (seeded), from hand-written templates: every
identifier is built with its own checksum computed in this file (Luhn for cards, ISO 7064 mod-97
for IBANs), never with the detector under test, so a label does not borrow the detector's
judgement. Each line: ``id``, ``group`` (``positive``: one kind in everyday text;
``clinical-negative``: clinical text that holds no PII at all; ``clinical-mixed``: clinical text
with PII in it), ``locale``, ``text`` and ``spans`` (``kind``, ``start``, ``end``, ``text``).

Scoring, per kind:
- recall: a labelled span counts as found when predicted spans *of its kind* cover all of it;
- precision: a predicted span counts as right when it lies inside a labelled span of its kind
  (running past it destroys text that was not PII, and counts as wrong).
Spaces and the punctuation ``.,;`` at either end of a span are ignored on both sides, so a
trailing full stop after "St." decides nothing. The clinical precision is the same count over
every prediction made on clinical text (negative and mixed): what the issue's "numbers that carry
clinical meaning must survive" asks.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from app.traces.redaction import DEFAULT_KINDS, Span, find_spans

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "domain" / "traces" / "pii_corpus.jsonl"
REPORT = ROOT / "docs" / "pii.md"
SEED = 15
RECALL_TARGET = 0.95
PRECISION_TARGET = 0.95

# ------------------------------------------------------------------------- building the corpus


def luhn_digit(body: str) -> str:
    """The check digit that makes ``body + digit`` pass Luhn."""
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:  # the digit next to the check digit is doubled
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def iban_check(country: str, bban: str) -> str:
    """ISO 7064 mod 97-10 check digits of an IBAN."""
    numeric = "".join(str(int(ch, 36)) for ch in bban + country + "00")
    return f"{98 - int(numeric) % 97:02d}"


@dataclass
class Snippet:
    id: str
    group: str
    locale: str
    text: str
    spans: list[dict[str, object]] = field(default_factory=list)
    heldout: bool = False

    def json(self) -> str:
        return json.dumps({"id": self.id, "group": self.group, "locale": self.locale,
                           "heldout": self.heldout, "text": self.text, "spans": self.spans},
                          ensure_ascii=False)


def snippet(id_: str, group: str, locale: str, template: str, **values: tuple[str, str]) -> Snippet:
    """``template`` with ``{name}`` slots; each value is (kind, text) and becomes a labelled span
    (kind "" fills the slot without a label)."""
    text, spans, rest = "", [], template
    while "{" in rest:
        head, tail = rest.split("{", 1)
        name, rest = tail.split("}", 1)
        text += head
        kind, value = values[name]
        if kind:
            spans.append({"kind": kind, "start": len(text), "end": len(text) + len(value),
                          "text": value})
        text += value
    return Snippet(id_, group, locale, text + rest, spans)


CARD_NETWORKS: list[tuple[str, str, int]] = [
    ("visa", "4", 16), ("visa13", "4", 13), ("visa19", "4", 19), ("mastercard", "53", 16),
    ("mastercard2", "2221", 16), ("amex", "37", 15), ("amex34", "34", 15),
    ("discover", "6011", 16), ("discover65", "65", 16), ("jcb", "3530", 16),
    ("diners", "36", 14), ("unionpay", "62", 16), ("unionpay19", "62", 19),
    ("maestro", "6759", 16), ("mir", "2202", 16),
]
CARD_CONTEXT = [
    ("en-US", "Please charge my card {x} for the copay."),
    ("en-US", "card number: {x}, exp 04/27"),
    ("en-GB", "My Visa is {x} if you need it."),
    ("en-US", "cc# {x} cvv 123"),
    ("de-DE", "Kartennummer {x} bitte belasten."),
    ("fr-FR", "Numéro de carte : {x}."),
    ("es-ES", "Pague con la tarjeta {x}, gracias"),
]


def _card(rng: random.Random, prefix: str, length: int) -> str:
    body = prefix + "".join(rng.choice("0123456789") for _ in range(length - len(prefix) - 1))
    return body + luhn_digit(body)


def _layout(number: str, layout: str) -> str:
    if layout == "unbroken":
        return number
    if len(number) == 15 and layout != "dashed":
        return f"{number[:4]} {number[4:10]} {number[10:]}"  # Amex
    if len(number) == 14 and layout != "dashed":
        return f"{number[:4]} {number[4:10]} {number[10:]}"  # Diners
    sep = " " if layout == "spaced" else "-"
    return sep.join(number[i : i + 4] for i in range(0, len(number), 4))


def card_snippets(rng: random.Random) -> Iterable[Snippet]:
    n = 0
    for network, prefix, length in CARD_NETWORKS:
        for layout in ("spaced", "dashed", "unbroken"):
            locale, template = CARD_CONTEXT[n % len(CARD_CONTEXT)]
            value = _layout(_card(rng, prefix, length), layout)
            yield snippet(f"card-{network}-{layout}", "positive", locale, template,
                          x=("CARD", value))
            n += 1


# Country, BBAN layout (n digit, a letter, c either) and locale. BE, ES and NO carry national
# check digits as well: they use the registry's published examples instead of random accounts.
IBAN_LAYOUTS = [
    ("GB", "aaaannnnnnnnnnnnnn", "en-GB"), ("DE", "nnnnnnnnnnnnnnnnnn", "de-DE"),
    ("FR", "nnnnnnnnnncccccccccccnn", "fr-FR"), ("IT", "annnnnnnnnncccccccccccc", "it-IT"),
    ("NL", "aaaannnnnnnnnn", "nl-NL"), ("CH", "nnnnncccccccccccc", "de-CH"),
    ("AT", "nnnnnnnnnnnnnnnn", "de-AT"), ("PL", "nnnnnnnnnnnnnnnnnnnnnnnn", "pl-PL"),
    ("SE", "nnnnnnnnnnnnnnnnnnnn", "sv-SE"), ("DK", "nnnnnnnnnnnnnn", "da-DK"),
    ("IE", "aaaannnnnnnnnnnnnn", "en-IE"), ("PT", "nnnnnnnnnnnnnnnnnnnnn", "pt-PT"),
    ("FI", "nnnnnnnnnnnnnn", "fi-FI"), ("LU", "nnnccccccccccccc", "fr-LU"),
]
IBAN_LENGTHS = {"GB": 22, "DE": 22, "FR": 27, "IT": 27, "NL": 18, "CH": 21, "AT": 20, "PL": 28,
                "SE": 24, "DK": 18, "IE": 22, "PT": 25, "FI": 18, "LU": 20, "BE": 16, "ES": 24,
                "NO": 15}
IBAN_EXAMPLES = [("BE68539007547034", "nl-BE"), ("ES9121000418450200051332", "es-ES"),
                 ("NO9386011117947", "nb-NO")]
IBAN_CONTEXT = ["Please transfer the refund to IBAN {x}.", "IBAN: {x}", "Konto {x} bei der Bank",
                "virement sur le compte {x} merci", "Refund to {x} (account holder J. Doe)"]


def _bban(rng: random.Random, layout: str) -> str:
    pools = {"n": "0123456789", "a": "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
             "c": "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"}
    return "".join(rng.choice(pools[ch]) for ch in layout)


def _spaced(compact: str) -> str:
    return " ".join(compact[i : i + 4] for i in range(0, len(compact), 4))


def iban_snippets(rng: random.Random) -> Iterable[Snippet]:
    ibans = []
    for country, layout, locale in IBAN_LAYOUTS:
        bban = _bban(rng, layout)
        ibans.append((country + iban_check(country, bban) + bban, locale))
    ibans += IBAN_EXAMPLES
    for compact, _ in ibans:  # the registry's lengths: a layout typed wrong fails here
        assert len(compact) == IBAN_LENGTHS[compact[:2]], compact
    for i, (compact, locale) in enumerate(ibans):
        for layout, value in (("compact", compact), ("spaced", _spaced(compact))):
            template = IBAN_CONTEXT[(2 * i + len(layout)) % len(IBAN_CONTEXT)]
            yield snippet(f"iban-{compact[:2].lower()}-{layout}", "positive", locale, template,
                          x=("IBAN", value))


# Phone numbers as people write them, in numbering ranges that exist (the UK ones are Ofcom's
# ranges set aside for drama; the US ones in 555-01xx are fictional but valid in the plan).
PHONES = [
    ("us-parens", "en-US", "Call me at {x} after 5pm.", "(617) 555-0142"),
    ("us-dashed", "en-US", "My cell is {x}.", "617-555-0142"),
    ("us-dotted", "en-US", "reach the daughter on {x}", "312.555.0187"),
    ("us-spaced", "en-US", "son: {x}", "212 555 0198"),
    ("us-plus1", "en-US", "international callers use {x}", "+1 617 555 0142"),
    ("us-plus1-parens", "en-US", "Office {x} (front desk)", "+1 (212) 555-0198"),
    ("us-tollfree", "en-US", "Helpline {x} anytime", "1-800-555-0199"),
    ("us-ext", "en-US", "Dr. Lee's office: {x}", "(415) 555-2671 ext. 204"),
    ("us-unbroken-kw", "en-US", "phone: {x}", "6175550142"),
    ("ca-dashed", "en-CA", "Toronto clinic {x}", "416-555-0123"),
    ("gb-intl", "en-GB", "call +44 first: {x}", "+44 20 7946 0958"),
    ("gb-intl-mobile", "en-GB", "Her mobile is {x}", "+44 7911 123456"),
    ("gb-00", "en-GB", "from abroad dial {x}", "0044 20 7946 0958"),
    ("gb-national-kw", "en-GB", "Tel. {x}", "020 7946 0958"),
    ("gb-mobile-kw", "en-GB", "mobile {x}", "07911 123456"),
    ("de-intl", "de-DE", "Rückruf unter {x} erbeten", "+49 30 901820"),
    ("de-intl-mobile", "de-DE", "Handynummer {x}", "+49 151 23456789"),
    ("de-00", "de-DE", "Tel {x}", "0049 30 901820"),
    ("de-national-kw", "de-DE", "Telefon: {x}", "030 901820"),
    ("de-mobile-kw", "de-DE", "Handy: {x}", "0151 23456789"),
    ("fr-intl", "fr-FR", "Joindre la famille au {x}.", "+33 1 42 68 53 00"),
    ("fr-intl-mobile", "fr-FR", "portable de la fille {x}", "+33 6 12 34 56 78"),
    ("fr-00", "fr-FR", "depuis l'étranger : {x}", "0033 1 42 68 53 00"),
    ("fr-national-kw", "fr-FR", "tél : {x}", "01 42 68 53 00"),
    ("fr-mobile-kw", "fr-FR", "portable {x}", "06 12 34 56 78"),
    ("es-intl", "es-ES", "llamar al {x}", "+34 912 345 678"),
    ("es-mobile-kw", "es-ES", "móvil {x}", "612 345 678"),
    ("it-intl", "it-IT", "chiamare il {x}", "+39 06 6982 1234"),
    ("it-mobile-kw", "it-IT", "cellulare {x}", "347 123 4567"),
    ("nl-intl", "nl-NL", "bel {x}", "+31 20 123 4567"),
    ("ch-00", "de-CH", "Tel. {x}", "0041 44 668 18 00"),
    ("au-intl", "en-AU", "Sydney office {x}", "+61 2 9374 4000"),
    ("au-mobile-kw", "en-AU", "mobile: {x}", "0412 345 678"),
    ("in-intl", "en-IN", "WhatsApp me on {x}", "+91 98765 43210"),
    ("jp-intl", "ja-JP", "Tokyo: {x}", "+81 3-1234-5678"),
    ("br-intl", "pt-BR", "celular {x}", "+55 11 91234-5678"),
    ("mx-intl", "es-MX", "teléfono {x}", "+52 55 1234 5678"),
    ("cn-intl", "zh-CN", "Beijing office {x}", "+86 10 6552 9988"),
    ("ie-intl", "en-IE", "Dublin {x}", "+353 1 234 5678"),
    ("se-intl", "sv-SE", "ring {x}", "+46 8 123 456 78"),
    ("za-intl", "en-ZA", "Cape Town {x}", "+27 21 123 4567"),
    ("sg-intl", "en-SG", "SG line {x}", "+65 6123 4567"),
]


def phone_snippets() -> Iterable[Snippet]:
    for name, locale, template, value in PHONES:
        yield snippet(f"phone-{name}", "positive", locale, template, x=("PHONE", value))


SSNS = [
    ("dashed", "SSN {x} on the intake form", "ssn-dashed"),
    ("dashed", "Social Security Number: {x}", "ssn-dashed-kw"),
    ("dashed", "my social is {x}", "ssn-dashed-bare"),
    ("dashed", "{x} is the number on her card", "ssn-dashed-start"),
    ("spaced", "SSN {x}", "ssn-spaced"),
    ("spaced", "social security no. {x}", "ssn-spaced-no"),
    ("spaced", "Social Security number {x}.", "ssn-spaced-number"),
    ("unbroken", "ssn: {x}", "ssn-unbroken"),
    ("unbroken", "SSN#{x}", "ssn-unbroken-hash"),
    ("unbroken", "SS# {x}", "ssn-unbroken-ss"),
    ("unbroken", "SSN is {x}", "ssn-unbroken-is"),
    ("dashed", "patient SSN: {x}; insurance pending", "ssn-dashed-semicolon"),
    ("dashed", "(SSN {x})", "ssn-dashed-parens"),
    ("spaced", "SSN: {x}, DOB unknown", "ssn-spaced-colon"),
    ("dashed", "ssn {x}", "ssn-lower"),
    ("unbroken", "Social Security Number {x}", "ssn-unbroken-long"),
    ("dashed", "File under {x} please", "ssn-dashed-file"),
    ("spaced", "SSN - {x}", "ssn-spaced-dash-kw"),
]


def _ssn(rng: random.Random, layout: str) -> str:
    area = rng.choice([a for a in range(1, 900) if a != 666])
    group, serial = rng.randint(1, 99), rng.randint(1, 9999)
    sep = {"dashed": "-", "spaced": " ", "unbroken": ""}[layout]
    return f"{area:03d}{sep}{group:02d}{sep}{serial:04d}"


def ssn_snippets(rng: random.Random) -> Iterable[Snippet]:
    for layout, template, name in SSNS:
        yield snippet(name, "positive", "en-US", template, x=("SSN", _ssn(rng, layout)))


EMAILS = [
    ("en-US", "email me at {x}", "jane.doe@example.org"),
    ("en-US", "Contact: {x}", "J.Smith@Hospital.example.com"),
    ("en-US", "send results to {x}.", "patient+labs@mail.example.net"),
    ("en-GB", "{x} is my work address", "a.n.other@nhs.example.co.uk"),
    ("de-DE", "E-Mail: {x}", "max.mustermann@beispiel.de"),
    ("fr-FR", "courriel : {x}", "marie_dupont@exemple.fr"),
    ("es-ES", "correo {x}", "jgarcia1987@correo.example.es"),
    ("en-US", "<{x}>", "bob@example.com"),
    ("en-US", "cc {x}, thanks", "nurse.station-4@clinic.example.org"),
    ("en-US", "mailto:{x}", "first.last@sub.domain.example.io"),
    ("en-US", "(daughter: {x})", "kim_lee99@example.com"),
    ("it-IT", "scrivere a {x}", "mario.rossi@esempio.it"),
    ("en-US", "User {x} asked", "USER123@EXAMPLE.COM"),
    ("en-US", "reply-to {x};", "o'brien@example.ie"),
    ("nl-NL", "mail {x}", "j.de.vries@voorbeeld.nl"),
    ("en-US", "from: {x}", "x@y.example"),
    ("en-US", "his address {x} bounced", "tom-harris@mail-server.example.com"),
    ("en-US", "{x}", "support@tracelearn.example"),
]


def email_snippets() -> Iterable[Snippet]:
    for i, (locale, template, value) in enumerate(EMAILS):
        yield snippet(f"email-{i}", "positive", locale, template, x=("EMAIL", value))


DOBS = [
    ("en-US", "DOB: {x}", "03/14/1957"),
    ("en-US", "D.O.B. {x}", "1957-03-14"),
    ("en-GB", "date of birth {x}", "14/03/1957"),
    ("en-US", "born on {x} in Ohio", "March 14, 1957"),
    ("en-GB", "born {x}", "14 March 1957"),
    ("en-US", "DOB {x}", "3/14/57"),
    ("en-US", "Birthdate: {x}", "1957/03/14"),
    ("de-DE", "geb. am {x}", "14.03.1957"),
    ("de-DE", "Geburtsdatum: {x}", "14.03.1957"),
    ("fr-FR", "née le {x}", "14/03/1957"),
    ("fr-FR", "date de naissance : {x}", "14/03/1957"),
    ("es-ES", "fecha de nacimiento: {x}", "14/03/1957"),
    ("es-ES", "nacida el {x}", "14-03-1957"),
    ("it-IT", "data di nascita {x}", "14/03/1957"),
    ("it-IT", "nato il {x}", "14/03/1957"),
    ("en-US", "DOB: {x}", "Mar 14 1957"),
    ("en-GB", "DOB - {x}", "14th March 1957"),
    ("en-US", "date of birth: {x}", "March 14th, 1957"),
    ("en-US", "dob {x}", "1948-11-02"),
    ("en-US", "Patient (DOB {x}) seen today", "02/29/1956"),
]


def dob_snippets() -> Iterable[Snippet]:
    for i, (locale, template, value) in enumerate(DOBS):
        yield snippet(f"dob-{i}", "positive", locale, template, x=("DOB", value))


MRNS = [
    ("MRN: {x}", "00482913"), ("MRN {x}", "7730021"), ("MRN# {x}", "12345678"),
    ("Medical record number: {x}", "AB123456"), ("medical record no. {x}", "4455667"),
    ("Patient ID: {x}", "20931847"), ("chart # {x}", "5566778"),
    ("Hospital number: {x}", "H-1234567"), ("NHS number {x}", "943 476 5919"),
    ("MRN={x}", "009912345"), ("med rec # {x}", "8812345"), ("mrn {x}", "55123987"),
    ("(MRN {x})", "3344556"), ("MRN is {x}", "77441122"), ("Medical Record #{x}", "61234509"),
]


def mrn_snippets() -> Iterable[Snippet]:
    for i, (template, value) in enumerate(MRNS):
        locale = "en-GB" if "NHS" in template or "Hospital" in template else "en-US"
        yield snippet(f"mrn-{i}", "positive", locale, template, x=("MRN", value))


IPS = [
    "192.168.1.20", "10.0.0.5", "172.16.254.1", "8.8.8.8", "203.0.113.7", "198.51.100.255",
    "2001:db8::1", "fe80::1ff:fe23:4567:890a", "2001:0db8:85a3:0000:0000:8a2e:0370:7334", "::1",
    "::ffff:192.0.2.128", "2606:4700:4700::1111", "FE80::0202:B3FF:FE1E:8329", "100.64.12.3",
    "255.255.255.0",
]
IP_CONTEXT = ["login from {x} at 09:12", "client IP {x}", "blocked {x}/24 on the firewall",
              "X-Forwarded-For: {x}", "ssh to {x}, then restart"]


def ip_snippets() -> Iterable[Snippet]:
    for i, value in enumerate(IPS):
        template = IP_CONTEXT[i % len(IP_CONTEXT)]
        yield snippet(f"ip-{i}", "positive", "en-US", template, x=("IP", value))


ADDRESSES = [
    "1600 Pennsylvania Ave NW, Washington, DC 20500", "350 Fifth Avenue", "123 Main Street, Apt 4B",
    "42 W 57th St", "55 Fruit St, Boston, MA 02114", "742 Evergreen Terrace",
    "4059 Mt Lee Dr", "1234 N. Oak Blvd, Suite 200", "77 Massachusetts Ave, Cambridge, MA 02139",
    "500 S State St", "9 Elm Ct", "250 Old Country Rd", "3100 West Lake Street", "8 Sunset Blvd",
    "P.O. Box 1234", "PO Box 56", "12 oak street", "45 maple ave",
    "2700 Martin Luther King Jr Way", "15-17 Park Place", "1 Hospital Drive, Unit 3",
    "600 N Michigan Ave, Chicago, IL 60611", "10 Rockefeller Plaza", "221B Baker Street",
    "88 Colin P Kelly Jr St, San Francisco, CA 94107",
]
ADDRESS_CONTEXT = ["lives at {x} with her husband", "Ship the kit to {x}.", "Address: {x}",
                   "moved to {x} last year", "{x} (home)"]


def address_snippets() -> Iterable[Snippet]:
    for i, value in enumerate(ADDRESSES):
        template = ADDRESS_CONTEXT[i % len(ADDRESS_CONTEXT)]
        yield snippet(f"address-{i}", "positive", "en-US", template, x=("ADDRESS", value))


# Clinical text that must come back as written: lab values, doses, scores, stages, dates of
# therapy, trial ids, versions, codes and ISBN-like numbers.
CLINICAL_NEGATIVES = [
    "ECOG 1, stage IV NSCLC, PD-L1 80%",
    "Hb 12.5 g/dL, dose 75 mg/m2 on 2024-03-01",
    "PFS 180 days after 2 cycles (C1D1 2023-11-05)",
    "Started osimertinib 80 mg on 03/14/2023",
    "weight 72.5 kg, BP 120/80, HR 72",
    "platelets 150,000/uL, ANC 1.5 x 10^9/L, WBC 4.5",
    "creatinine 1.1 mg/dL, eGFR 68 mL/min/1.73m2",
    "carboplatin AUC 5 + pemetrexed 500 mg/m2 q3w x 4 cycles",
    "pembrolizumab 200 mg IV every 21 days since 2022-07-18",
    "QTc 452 ms on ECG 2024-01-09; K 4.1 mmol/L",
    "T2N1M0, stage IIB; Gleason 4+3=7; PSA 12.4 ng/mL",
    "HER2 3+, ER 90%, PR 40%, Ki-67 25%",
    "EGFR exon 19 deletion; c.2573T>G (p.L858R) detected",
    "enrolled in NCT04294498 on 11/02/2023",
    "EudraCT 2019-001234-56, cohort B, arm 2",
    "ISBN 978-0-306-40615-7 (Harrison's, 21st ed.)",
    "see ISBN 0-306-40615-2, chapter 12",
    "accession 9780306406157",
    "NDC 0002-3227-30, lot 123456789, exp 2026-08",
    "ICD-10 C34.90, CPT 96413, LOINC 2160-0",
    "tumour 34 x 22 mm, down from 41 x 30 mm (RECIST PR)",
    "CA 19-9 1234 U/mL, CEA 45.2 ng/mL",
    "HbA1c 7.2%, glucose 142 mg/dL fasting",
    "BSA 1.85 m2; docetaxel 75 mg/m2 = 139 mg",
    "infusion at 125 mL/h over 30 min; premedicated at 10:30:00",
    "INR 2.3 on warfarin 5 mg daily",
    "TSH 4.12 mIU/L, free T4 1.1 ng/dL",
    "ferritin 1500 ng/mL; transfusion 2 units 2024-02-11",
    "SUVmax 12.4 in the right upper lobe, 2.3 cm",
    "MoCA 24/30, MMSE 26/30",
    "version 1.2.3.4.5 of 10.0.0",
    "pipeline v2.1.0.3 on build 10.0.19045.3570",
    "running release 4.12.0; schema 0006",
    "ratio 3:1, dilution 1:100, titre 1:2560",
    "dose +5 mg, +20 %, z-score +1.5",
    "5 mg daily for 14 days, then 2.5 mg",
    "Dr. Smith saw 2 patients on ward 4B",
    "lives a 2 hour drive from the clinic",
    "takes it 3 times a day with food",
    "walked 200 m in the 6-minute walk test",
    "C3D8 labs on 2023-12-14, next cycle 2024-01-04",
    "radiotherapy 60 Gy in 30 fractions, 2 Gy per fraction",
    "neutrophils 0.8 x10^9/L (grade 3), day 10 of cycle 2",
    "OS 18.6 months (95% CI 15.2-22.1), HR 0.71, p=0.002",
    "trial ids NCT03215706 and NCT02409342 screened",
    "protocol KEYNOTE-189, amendment 3, dated 2019-05-20",
    "LVEF 55% on echo 2024-02-02; BNP 230 pg/mL",
    "sodium 134, potassium 3.9, chloride 101, bicarbonate 24",
    "specimen S24-031512, block A3",
    "Oncotype DX recurrence score 18",
    "tumor mutational burden 12 mut/Mb, MSI-stable",
    "ALK fusion by FISH in 42 of 50 cells (84%)",
    "12 lead ECG: sinus rhythm 78 bpm, PR 160 ms, QRS 92 ms",
    "O2 sat 94% on 2 L/min; RR 18",
    "height 168 cm, BMI 25.6 kg/m2",
    "IV fluids 1000 mL 0.9% NaCl over 8 h",
    "morphine 2-4 mg IV q4h prn",
    "dexamethasone 8 mg bid days 1-3",
    "CTCAE v5.0 grade 2 rash",
    "ClinicalTrials.gov NCT01234567 phase 3",
    "NPI 1497758544 (ordering provider)",
    "accession number 2024031512 for the biopsy",
    "order 1234567890123456 shipped",
    "random 4111111111111112",
    "GB82 WEST 1234 5698 7654 33 failed the check",
    "code 123 45 6789 from the kit",
    "lot 123456789",
    "barcode 9312345678907",
    "EAN 5012345678908 on the reagent box",
    "ABG: pH 7.35, PaCO2 40, PaO2 80, HCO3 24",
    "urine pH 6.0, SG 1.020, call back in 2 weeks",
    "OID 1.2.840.113619.2.55.3.604688119",
    "DICOM study 1.3.6.1.4.1.14519.5.2.1.6279.6001",
    "chr7:55,191,822 (GRCh38)",
    "rs121434568 heterozygous",
    "ANC 2100/uL, platelets 98000/uL",
    "prescription Rx 4567890, refills 2",
    "room 1204, bed 2, floor 12",
    "pager 4471",
    "extension 23456",
    "fax cover sheet page 1 of 3",
    "at 14:05 the patient was seen; next at 16:30",
    "08:00-12:00 infusion window",
    "timepoints 0, 2, 4, 8, 24 h post-dose",
    "cumulative doxorubicin 300 mg/m2",
    "Child-Pugh A5, MELD 9",
    "CD4 350 cells/mm3, viral load < 20 copies/mL",
    "T 38.2 C, HR 110, BP 98/60",
    "stage IIIA (T2bN2M0) per AJCC 8th edition",
    "PD-L1 TPS 50%, CPS 60",
    "1.5 cm nodule, Lung-RADS 4A",
    "BI-RADS 4, 12 o'clock, 3 cm from nipple",
    "3 + 3 = 6 Gleason, 2 of 12 cores",
    "hemoglobin 9.8 (ref 12.0-16.0)",
    "dates of therapy 01/05/2023-06/20/2023",
    "second line from 2023-07-01 to 2023-12-31",
    "cycle 6 given 12.03.2024, next 02.04.2024",
    "last dose 14 March 2024",
    "ISBN-13 9781234567897",
    "9 780306 406157",
    "CAS 50-18-0 (cyclophosphamide)",
    "UNII 8N3DW7272P",
    "ATC L01XE03",
    "lab ref 2023-0456-7890",
    "temperature 36.8, weight 61.2, 1.72 m",
    "Karnofsky 80%, ECOG 0-1",
    "ages 18-75, ECOG 0-2, life expectancy > 12 weeks",
    "administered 1 000 mg in 250 mL",
    "counts 4 112 cells in 1 000 fields",
]
# Clinical notes that do carry PII: the identifiers must go, the clinical numbers must stay.
CLINICAL_MIXED: list[tuple[str, str, dict[str, tuple[str, str]]]] = [
    ("en-US", "68-year-old woman, DOB: {d}, MRN: {m}. ECOG 1, stage IV NSCLC.",
     {"d": ("DOB", "03/14/1957"), "m": ("MRN", "00482913")}),
    ("en-US", "Contact daughter at {e} or {p}. Hb 10.2 g/dL.",
     {"e": ("EMAIL", "jane.doe@example.org"), "p": ("PHONE", "(617) 555-0142")}),
    ("en-US", "Started osimertinib 80 mg on 2023-03-14; SSN {s} on file.",
     {"s": ("SSN", "219-09-9999")}),
    ("en-US", "Pt lives at {a}; carboplatin AUC 5 q3w x 4.",
     {"a": ("ADDRESS", "55 Fruit St, Boston, MA 02114")}),
    ("en-GB", "NHS number {m}, ECOG 2, PD-L1 80%, call {p}.",
     {"m": ("MRN", "943 476 5919"), "p": ("PHONE", "+44 20 7946 0958")}),
    ("de-DE", "geb. am {d}, Handy: {p}, Hb 11,2 g/dl, Zyklus 3 am 12.03.2024.",
     {"d": ("DOB", "14.03.1957"), "p": ("PHONE", "0151 23456789")}),
    ("fr-FR", "née le {d}, tél : {p}, ECOG 1, 4 cycles depuis le 05/01/2024.",
     {"d": ("DOB", "14/03/1957"), "p": ("PHONE", "01 42 68 53 00")}),
    ("en-US", "Copay card {c} declined; PSA 12.4 ng/mL.",
     {"c": ("CARD", "4111 1111 1111 1111")}),
    ("en-US", "Portal login from {i}; QTc 452 ms on 2024-01-09.",
     {"i": ("IP", "203.0.113.7")}),
    ("de-DE", "Erstattung auf {b}; Kreatinin 1,1 mg/dl.",
     {"b": ("IBAN", "DE89 3704 0044 0532 0130 00")}),
    ("en-US", "Patient ID: {m}, enrolled NCT04294498 on 11/02/2023, arm B.",
     {"m": ("MRN", "20931847")}),
    ("en-US", "DOB {d}; pembrolizumab 200 mg q21d since 2022-07-18; email {e}",
     {"d": ("DOB", "1948-11-02"), "e": ("EMAIL", "kim_lee99@example.com")}),
    ("en-US", "Son ({p}) asked about the 60 Gy in 30 fractions plan.",
     {"p": ("PHONE", "212-555-0198")}),
    ("en-US", "Address: {a}. ANC 1.5 x 10^9/L, platelets 150,000/uL.",
     {"a": ("ADDRESS", "350 Fifth Avenue")}),
    ("en-US", "ssn: {s}; HER2 3+, ER 90%, Ki-67 25%.",
     {"s": ("SSN", "536221234")}),
    ("en-IN", "WhatsApp {p}; HbA1c 7.2%, weight 72.5 kg.",
     {"p": ("PHONE", "+91 98765 43210")}),
    ("es-ES", "fecha de nacimiento: {d}; docetaxel 75 mg/m2; IBAN {b}",
     {"d": ("DOB", "14/03/1957"), "b": ("IBAN", "ES91 2100 0418 4502 0005 1332")}),
    ("en-US", "MRN {m} | T2N1M0 | Gleason 4+3=7 | {a}",
     {"m": ("MRN", "7730021"), "a": ("ADDRESS", "123 Main Street, Apt 4B")}),
    ("en-US", "born on {d}, CA 19-9 1234 U/mL, reach at {e}",
     {"d": ("DOB", "March 14, 1957"), "e": ("EMAIL", "patient+labs@mail.example.net")}),
    ("en-US", "Visit 2024-02-11 from {i}; LVEF 55%, BNP 230 pg/mL",
     {"i": ("IP", "2001:db8::1")}),
    ("it-IT", "nato il {d}, cellulare {p}, creatinina 1,1",
     {"d": ("DOB", "14/03/1957"), "p": ("PHONE", "347 123 4567")}),
    ("en-US", "C1D1 2023-11-05 (SSN {s}), dose 80 mg, BSA 1.85 m2",
     {"s": ("SSN", "078-05-1120")}),
    ("en-US", "Mail kit to {a}; OS 18.6 months, HR 0.71",
     {"a": ("ADDRESS", "P.O. Box 1234")}),
    ("en-US", "card {c}, exp 04/27, for the 14-day supply of 5 mg",
     {"c": ("CARD", "3782 822463 10005")}),
    ("en-US", "Dr. Lee {p}; TSH 4.12, INR 2.3, K 4.1",
     {"p": ("PHONE", "(415) 555-2671")}),
]


# Written after the detectors above were tuned on the rest of the corpus and scored without
# changing them afterwards: the report gives their figures apart, as the honest estimate.
HELDOUT: list[tuple[str, str, str, dict[str, tuple[str, str]]]] = [
    ("positive", "en-US", "you can bill {c} (Visa)", {"c": ("CARD", "4556 7375 8689 9855")}),
    ("positive", "en-US", "Mastercard ending ...: {c}", {"c": ("CARD", "5425-2334-3010-9903")}),
    ("positive", "en-US", "AMEX {c} exp 11/26", {"c": ("CARD", "371449635398431")}),
    ("positive", "en-US", "discover card {c}", {"c": ("CARD", "6011 0009 9013 9424")}),
    ("positive", "ja-JP", "JCB {c}", {"c": ("CARD", "3566002020360505")}),
    ("positive", "en-US", "diners {c}", {"c": ("CARD", "3056 930902 5904")}),
    ("positive", "en-GB", "pay into {b} please", {"b": ("IBAN", "GB29 NWBK 6016 1331 9268 19")}),
    ("positive", "nl-NL", "rekening {b}", {"b": ("IBAN", "NL91ABNA0417164300")}),
    ("positive", "de-AT", "IBAN {b}", {"b": ("IBAN", "AT61 1904 3002 3457 3201")}),
    ("positive", "fr-FR", "RIB/IBAN : {b}", {"b": ("IBAN", "FR1420041010050500013M02606")}),
    ("positive", "it-IT", "bonifico su {b}", {"b": ("IBAN", "IT60 X054 2811 1010 0000 0123 456")}),
    ("positive", "en-US", "text me {p}", {"p": ("PHONE", "(202) 555-0173")}),
    ("positive", "en-US", "Front desk: {p}", {"p": ("PHONE", "+1-206-555-0110")}),
    ("positive", "en-GB", "ring the ward on {p}", {"p": ("PHONE", "+44 161 496 0000")}),
    ("positive", "de-DE", "erreichbar unter {p}", {"p": ("PHONE", "+49 89 12345678")}),
    ("positive", "fr-FR", "appelez le {p}", {"p": ("PHONE", "+33 4 91 23 45 67")}),
    ("positive", "es-ES", "Tel.: {p}", {"p": ("PHONE", "93 123 45 67")}),
    ("positive", "en-AU", "call {p}", {"p": ("PHONE", "(02) 9876 5432")}),
    ("positive", "en-US", "SSN: {s}", {"s": ("SSN", "457-55-5462")}),
    ("positive", "en-US", "her social security number is {s}", {"s": ("SSN", "323 45 6789")}),
    ("positive", "en-US", "write to {e}", {"e": ("EMAIL", "r.patel@uni.example.ac.uk")}),
    ("positive", "en-US", "Email:{e}", {"e": ("EMAIL", "lee.w@example.com")}),
    ("positive", "en-US", "DOB {d}", {"d": ("DOB", "07-04-1962")}),
    ("positive", "en-US", "Date of Birth: {d}", {"d": ("DOB", "July 4, 1962")}),
    ("positive", "de-DE", "geboren am {d}", {"d": ("DOB", "04.07.1962")}),
    ("positive", "en-US", "MRN: {m}", {"m": ("MRN", "MR0012345")}),
    ("positive", "en-US", "medical record number {m}", {"m": ("MRN", "99887766")}),
    ("positive", "en-US", "request from {i}", {"i": ("IP", "34.120.8.19")}),
    ("positive", "en-US", "peer {i} timed out", {"i": ("IP", "2a00:1450:4001:82a::200e")}),
    ("positive", "en-US", "she lives at {a}", {"a": ("ADDRESS", "1420 Elm Street, Springfield, IL 62704")}),
    ("positive", "en-US", "deliver to {a}", {"a": ("ADDRESS", "77 Sunset Boulevard")}),
    ("positive", "en-US", "{a}", {"a": ("ADDRESS", "3 Pine Rd, Apt 12")}),
    ("clinical-negative", "en-US", "albumin 3.2 g/dL, bilirubin 1.8 mg/dL, ALT 45 U/L", {}),
    ("clinical-negative", "en-US", "nivolumab 240 mg q2w from 2021-09-14 to 2022-03-01", {}),
    ("clinical-negative", "en-US", "ECOG PS 2; stage IIIB; 3 prior lines", {}),
    ("clinical-negative", "en-US", "enrolled on NCT05048797 (cohort 3), screening 2024-04-02", {}),
    ("clinical-negative", "en-US", "LDH 480 U/L (ULN 250), beta-2 microglobulin 5.6 mg/L", {}),
    ("clinical-negative", "en-US", "ISBN 978-1-4511-9185-4, p. 1123", {}),
    ("clinical-negative", "en-US", "firmware 3.4.1.7 on the infusion pump", {}),
    ("clinical-negative", "en-US", "cisplatin 75 mg/m2 day 1, etoposide 100 mg/m2 days 1-3", {}),
    ("clinical-negative", "en-US", "Ki-67 30%, mitoses 12/10 HPF", {}),
    ("clinical-negative", "en-US", "follow-up CT 2024-06-18: SD per RECIST 1.1", {}),
    ("clinical-negative", "en-US", "WBC 11.2, Hgb 9.1, Plt 412, MCV 78", {}),
    ("clinical-negative", "en-US", "urine output 1200 mL/24 h, 24-h protein 3.5 g", {}),
    ("clinical-negative", "en-US", "dose reduced to 60 mg from 80 mg on 03.05.2024", {}),
    ("clinical-negative", "en-US", "vial lot 2024-1187-A, expiry 09/2026", {}),
    ("clinical-negative", "en-US", "4 weeks on, 2 weeks off; cycle length 42 days", {}),
    ("clinical-negative", "en-US", "QT interval 420-460 ms across 3 ECGs", {}),
    ("clinical-mixed", "en-US", "DOB: {d}; ECOG 1; call {p} re: cycle 4 on 2024-05-02",
     {"d": ("DOB", "11/23/1950"), "p": ("PHONE", "617-555-0190")}),
    ("clinical-mixed", "en-US", "MRN {m}, Hb 8.9 g/dL, transfuse 2 units; home {a}",
     {"m": ("MRN", "4412987"), "a": ("ADDRESS", "18 Willow Lane")}),
    ("clinical-mixed", "en-GB", "email {e} with the PSA 4.2 result from 12/03/2024",
     {"e": ("EMAIL", "p.jones@example.co.uk")}),
]


def heldout_snippets() -> Iterable[Snippet]:
    for i, (group, locale, template, values) in enumerate(HELDOUT):
        if values:
            item = snippet(f"heldout-{i}", group, locale, template, **values)
        else:
            item = Snippet(f"heldout-{i}", group, locale, template)
        item.heldout = True
        yield item


def clinical_snippets() -> Iterable[Snippet]:
    for i, text in enumerate(CLINICAL_NEGATIVES):
        yield Snippet(f"clinical-negative-{i}", "clinical-negative", "en-US", text)
    for i, (locale, template, values) in enumerate(CLINICAL_MIXED):
        yield snippet(f"clinical-mixed-{i}", "clinical-mixed", locale, template, **values)


def build_corpus() -> list[Snippet]:
    rng = random.Random(SEED)
    return [*card_snippets(rng), *iban_snippets(rng), *phone_snippets(), *ssn_snippets(rng),
            *email_snippets(), *dob_snippets(), *mrn_snippets(), *ip_snippets(),
            *address_snippets(), *clinical_snippets(), *heldout_snippets()]


def corpus_text(snippets: list[Snippet]) -> str:
    return "".join(s.json() + "\n" for s in snippets)


def load_corpus(path: Path = CORPUS) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------- scoring

_EDGE = " .,;"


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start] in _EDGE:
        start += 1
    while end > start and text[end - 1] in _EDGE:
        end -= 1
    return start, end


@dataclass
class KindScore:
    labelled: int = 0
    found: int = 0
    predicted: int = 0
    right: int = 0

    @property
    def recall(self) -> float:
        return self.found / self.labelled if self.labelled else 1.0

    @property
    def precision(self) -> float:
        return self.right / self.predicted if self.predicted else 1.0


@dataclass
class Scores:
    kinds: dict[str, KindScore]
    clinical: KindScore  # every prediction on clinical text (negative + mixed)
    negatives: int
    negatives_intact: int
    snippets: int
    misses: list[str]  # "id: KIND 'text'" for every labelled span not found
    wrong: list[str]  # "id: KIND 'text'" for every wrong prediction


def score(corpus: list[dict[str, object]],
          detect: object = find_spans) -> Scores:
    """Per-kind precision and recall of ``detect`` (text → spans) on ``corpus``."""
    kinds = {k: KindScore() for k in DEFAULT_KINDS}
    clinical = KindScore()
    negatives = intact = 0
    misses: list[str] = []
    wrong: list[str] = []
    assert callable(detect)
    for item in corpus:
        text = str(item["text"])
        labels = [(str(s["kind"]), *_trim(text, int(s["start"]), int(s["end"])))  # type: ignore[call-overload]
                  for s in item["spans"]]  # type: ignore[attr-defined]
        spans: list[Span] = detect(text)
        predicted = [(s.kind, *_trim(text, s.start, s.end)) for s in spans]
        for kind, start, end in labels:
            kinds[kind].labelled += 1
            covered = {i for k, s, e in predicted if k == kind for i in range(s, e)}
            if all(i in covered for i in range(start, end)):
                kinds[kind].found += 1
            else:
                misses.append(f"{item['id']}: {kind} {text[start:end]!r} in {text!r}")
        for kind, start, end in predicted:
            ok = any(k == kind and ls <= start and end <= le for k, ls, le in labels)
            kinds[kind].predicted += 1
            kinds[kind].right += ok
            if str(item["group"]).startswith("clinical"):
                clinical.predicted += 1
                clinical.right += ok
            if not ok:
                wrong.append(f"{item['id']}: {kind} {text[start:end]!r} in {text!r}")
        if item["group"] == "clinical-negative":
            negatives += 1
            intact += not predicted
    return Scores(kinds, clinical, negatives, intact, len(corpus), misses, wrong)


def report(scores: Scores, corpus: list[dict[str, object]]) -> str:
    groups: dict[str, int] = {}
    locales: set[str] = set()
    for item in corpus:
        groups[str(item["group"])] = groups.get(str(item["group"]), 0) + 1
        locales.add(str(item["locale"]))
    lines = [
        "| kind | labelled spans | found | recall | predicted | right | precision |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, k in scores.kinds.items():
        lines.append(f"| {kind} | {k.labelled} | {k.found} | {k.recall:.3f} | {k.predicted} | "
                     f"{k.right} | {k.precision:.3f} |")
    total = KindScore(*(sum(getattr(k, f) for k in scores.kinds.values())
                        for f in ("labelled", "found", "predicted", "right")))
    lines.append(f"| **all** | {total.labelled} | {total.found} | {total.recall:.3f} | "
                 f"{total.predicted} | {total.right} | {total.precision:.3f} |")
    c = scores.clinical
    lines += [
        "",
        f"Clinical text ({groups.get('clinical-negative', 0)} negatives without PII, "
        f"{groups.get('clinical-mixed', 0)} notes with PII in them): {c.predicted} predictions, "
        f"{c.right} right, **precision {c.precision:.3f}**; {scores.negatives_intact} of "
        f"{scores.negatives} negatives come back unchanged.",
        "",
        f"Corpus: {scores.snippets} snippets ({', '.join(f'{n} {g}' for g, n in sorted(groups.items()))}), "
        f"{len(locales)} locales ({', '.join(sorted(locales))}).",
    ]
    held = [item for item in corpus if item.get("heldout")]
    if held:
        h = score(held)
        h_total = KindScore(*(sum(getattr(k, f) for k in h.kinds.values())
                              for f in ("labelled", "found", "predicted", "right")))
        lines += [
            "",
            f"Of these, the held-out block ({len(held)} snippets): recall {h_total.recall:.3f} "
            f"({h_total.found}/{h_total.labelled}), precision {h_total.precision:.3f} "
            f"({h_total.right}/{h_total.predicted}); clinical precision "
            f"{h.clinical.precision:.3f} ({h.clinical.right}/{h.clinical.predicted}), "
            f"{h.negatives_intact} of {h.negatives} negatives unchanged.",
        ]
    if scores.misses:
        lines += ["", "Missed:", *[f"- `{m}`" for m in scores.misses]]
    if scores.wrong:
        lines += ["", "Wrong predictions:", *[f"- `{w}`" for w in scores.wrong]]
    return "\n".join(lines) + "\n"


TABLE_START = "<!-- pii-table:start -->"
TABLE_END = "<!-- pii-table:end -->"


def write_report(path: Path = REPORT) -> str:
    """Replaces the measured block of ``docs/pii.md`` with a fresh measurement."""
    corpus = load_corpus()
    table = report(score(corpus), corpus)
    doc = path.read_text()
    head, rest = doc.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    path.write_text(f"{head}{TABLE_START}\n{table}{TABLE_END}{tail}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["corpus", "report"])
    args = parser.parse_args()
    if args.what == "corpus":
        CORPUS.write_text(corpus_text(build_corpus()))
        print(f"wrote {CORPUS.relative_to(ROOT)}")
    else:
        print(write_report())


if __name__ == "__main__":
    main()
