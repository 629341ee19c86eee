"""Precision and recall of the PII detectors, per kind, on the labelled corpus
(tests/domain/traces/pii_corpus.jsonl, built by ``python -m benchmarks.pii corpus``).

Targets (issue 15): recall ≥ 0.95 on every kind, precision ≥ 0.95 on clinical text; the
figures in docs/pii.md are the ones measured here."""

from __future__ import annotations

import orjson
import pytest

from app.traces.redaction import (
    DEFAULT_KINDS,
    find_spans,
    iban_valid,
    luhn_valid,
    possible_kinds,
)
from benchmarks.pii import (
    CORPUS,
    PRECISION_TARGET,
    RECALL_TARGET,
    REPORT,
    TABLE_END,
    TABLE_START,
    Scores,
    build_corpus,
    corpus_text,
    load_corpus,
    report,
    score,
)

CORPUS_ITEMS = load_corpus()


@pytest.fixture(scope="module")
def scores() -> Scores:
    return score(CORPUS_ITEMS)


def test_the_committed_corpus_is_what_the_generator_writes() -> None:
    assert CORPUS.read_text() == corpus_text(build_corpus())


def test_the_corpus_covers_every_kind_and_clinical_negatives() -> None:
    assert len(CORPUS_ITEMS) >= 300
    per_kind = {k: 0 for k in DEFAULT_KINDS}
    for item in CORPUS_ITEMS:
        for span in item["spans"]:  # type: ignore[attr-defined]
            per_kind[span["kind"]] += 1
    assert min(per_kind.values()) >= 15, per_kind
    negatives = [i for i in CORPUS_ITEMS if i["group"] == "clinical-negative"]
    assert len(negatives) >= 100 and all(not i["spans"] for i in negatives)
    assert len({i["locale"] for i in CORPUS_ITEMS}) >= 10


def test_every_label_points_at_its_text_and_checksummed_kinds_hold_their_checksum() -> None:
    for item in CORPUS_ITEMS:
        for span in item["spans"]:  # type: ignore[attr-defined]
            value = str(item["text"])[span["start"] : span["end"]]
            assert value == span["text"], item["id"]
            if span["kind"] == "CARD":
                assert luhn_valid(value.replace(" ", "").replace("-", "")), item["id"]
            if span["kind"] == "IBAN":
                assert iban_valid(value), item["id"]


@pytest.mark.parametrize("kind", DEFAULT_KINDS)
def test_recall_per_kind_meets_the_target(scores: Scores, kind: str) -> None:
    k = scores.kinds[kind]
    missed = [m for m in scores.misses if f": {kind} " in m]
    assert k.recall >= RECALL_TARGET, (k, missed)


@pytest.mark.parametrize("kind", DEFAULT_KINDS)
def test_precision_per_kind_meets_the_target(scores: Scores, kind: str) -> None:
    k = scores.kinds[kind]
    wrong = [w for w in scores.wrong if f": {kind} " in w]
    assert k.precision >= PRECISION_TARGET, (k, wrong)


def test_clinical_numbers_survive(scores: Scores) -> None:
    assert scores.clinical.precision >= PRECISION_TARGET, scores.wrong
    assert scores.negatives_intact >= PRECISION_TARGET * scores.negatives


def test_docs_show_the_figures_measured_here(scores: Scores) -> None:
    doc = REPORT.read_text()
    block = doc.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0]
    assert block.strip() == report(scores, CORPUS_ITEMS).strip(), (
        "docs/pii.md is stale: run `python -m benchmarks.pii report`")


def test_a_trace_level_needs_check_never_drops_a_detector_that_finds_something() -> None:
    """``possible_kinds`` on a trace's JSON narrows the detectors each string runs; on every
    corpus text, wrapped as a trace's pieces are (a message, metadata, non-ASCII around it),
    every kind ``find_spans`` finds must survive it."""
    wrappers = [
        lambda t: [[{"role": "user", "content": t}], "ok", {}],
        lambda t: [[{"role": "user", "content": "é"}], {"content": t}, {"note": "ü " + t}],
    ]
    checked = 0
    for item in CORPUS_ITEMS:
        found = {s.kind for s in find_spans(item["text"])}
        for wrap in wrappers:
            kept = possible_kinds(orjson.dumps(wrap(item["text"])).decode())
            assert found <= set(kept), (item["id"], found - set(kept))
        checked += bool(found)
    assert checked >= 200
    # Nothing to find anywhere: nothing to run.
    assert possible_kinds(orjson.dumps([[{"role": "user", "content": "no digits"}], "yes", {}])
                          .decode()) == ()
