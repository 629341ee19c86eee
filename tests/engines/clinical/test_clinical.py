"""Synthetic clinical task: determinism, splits, ingest shape, documented noise level."""

from __future__ import annotations

import random
import re
from dataclasses import replace

import pytest

from workers.clinical import task
from workers.graders import parse_answer


def test_same_seed_same_examples_and_items() -> None:
    assert task.generate(3, 50) == task.generate(3, 50)
    assert task.ingest_items(3, 20) == task.ingest_items(3, 20)


def test_different_seed_or_split_gives_different_examples() -> None:
    a = task.generate(3, 50, "train")
    assert a != task.generate(4, 50, "train")
    held = task.generate(3, 50, "heldout")
    assert {e.case for e in a}.isdisjoint({e.case for e in held})
    assert all(e.external_id.startswith("clin-heldout-") for e in held)


def test_ingest_item_has_the_api_shape() -> None:
    item = task.ingest_items(0, 1, policy="p")[0]
    assert set(item) == {"external_id", "policy", "messages", "response", "metadata", "outcome"}
    assert item["policy"] == "p"
    assert [m["role"] for m in item["messages"]] == ["system", "user"]
    assert item["outcome"]["name"] == "pfs_gt_180d"
    assert isinstance(item["outcome"]["value"], bool)


def test_outcomes_follow_the_hidden_model_and_bayes_bound_is_well_below_one() -> None:
    examples = task.generate(0, 4000)
    base_rate = sum(e.outcome for e in examples) / len(examples)
    assert 0.4 < base_rate < 0.6
    bayes = task.bayes_optimal_accuracy(n=20_000)
    assert 0.70 < bayes < 0.82
    # the Bayes rule (sign of the logit) achieves about the bound on sampled outcomes
    acc = sum((task.true_logit(e.case) > 0) == e.outcome for e in examples) / len(examples)
    assert abs(acc - bayes) < 0.03


def test_weak_model_rarely_follows_the_contract() -> None:
    rng = random.Random(0)
    examples = task.generate(1, 2000)
    parsed = [parse_answer(task.weak_response(e.case, rng)) for e in examples]
    parse_rate = sum(p is not None for p in parsed) / len(parsed)
    assert 0.08 < parse_rate < 0.2


# --- styles --------------------------------------------------------------------------------------

# Every field the hidden model reads, with one alternative value that changes the logit.
OUTCOME_FIELDS: dict[str, list[object]] = {
    "age": [50, 80],
    "ecog": [0, 1, 2, 3],
    "stage": ["II", "III", "IV"],
    "histology": ["adenocarcinoma", "squamous", "large cell"],
    "biomarker": task.BIOMARKERS,
    "line": [1, 2, 3],
    "regimen": task.REGIMENS,
    "prior_response": ["none", "CR", "PR", "SD", "PD"],
    "ldh": [250, 251],
    "albumin": [3.4, 3.5],
    "hemoglobin": [9.9, 10.0],
    "brain_mets": [False, True],
}


def test_there_are_five_styles_and_exactly_one_is_unseen() -> None:
    assert len(task.STYLES) >= 5
    assert task.UNSEEN_STYLE in task.STYLES
    assert task.UNSEEN_STYLE not in task.SEEN_STYLES
    assert set(task.SEEN_STYLES) | {task.UNSEEN_STYLE} == set(task.STYLES)


def test_every_style_renders_every_field_the_outcome_depends_on() -> None:
    # Changing any one field to any other value changes the text, in every style: no style drops
    # (or rounds away across a threshold) information the ground truth reads.
    base = task.generate(0, 1)[0].case
    for style in task.STYLES:
        for name, values in OUTCOME_FIELDS.items():
            texts = {task.render(replace(base, **{name: v}), style) for v in values}
            assert len(texts) == len(values), (style, name)


def test_every_style_shows_each_value_in_its_own_units() -> None:
    case = replace(task.generate(0, 1)[0].case, ldh=251, albumin=3.4, hemoglobin=9.9, ecog=2,
                   age=71, stage="III", line=2, prior_response="PR", regimen="osimertinib",
                   biomarker="EGFR", brain_mets=True)
    for style in task.STYLES:
        text = task.render(case, style)
        assert "71" in text and "III" in text and "osimertinib" in text and "EGFR" in text, style
        if style == "si_units":
            assert "LDH 4.18 µkat/L" in text  # 251 / 60
            assert "albumin 34 g/L" in text and "haemoglobin 99 g/L" in text
            assert "WHO performance status 2" in text
        else:
            assert "251" in text and "3.4" in text and "9.9" in text, style


def test_si_values_parse_back_to_the_exact_case_values() -> None:
    pattern = re.compile(r"LDH ([\d.]+) µkat/L, albumin (\d+) g/L, haemoglobin (\d+) g/L")
    for ex in task.generate(5, 300, "heldout", styles=[task.UNSEEN_STYLE]):
        m = pattern.search(task.render(ex.case, "si_units"))
        assert m is not None
        assert round(float(m.group(1)) * 60) == ex.case.ldh
        assert int(m.group(2)) / 10 == ex.case.albumin
        assert int(m.group(3)) / 10 == ex.case.hemoglobin


def test_fields_style_parses_back_to_the_case() -> None:
    for ex in task.generate(6, 50, "train", styles=["fields"]):
        text = task.render(ex.case, "fields")
        fields = dict(line.split(": ", 1) for line in text.splitlines())
        assert int(fields["Age"]) == ex.case.age
        assert int(fields["ECOG"]) == ex.case.ecog
        assert fields["Regimen"] == ex.case.regimen and fields["Biomarker"] == ex.case.biomarker
        assert int(fields["LDH (U/L)"]) == ex.case.ldh
        assert float(fields["Albumin (g/dL)"]) == ex.case.albumin
        assert (fields["Brain metastases"] == "yes") == ex.case.brain_mets


def test_styled_generation_is_deterministic_and_keeps_cases_and_outcomes() -> None:
    mixed = task.generate(3, 60, "heldout")
    assert mixed == task.generate(3, 60, "heldout")
    for style in task.STYLES:
        one = task.generate(3, 60, "heldout", styles=[style])
        assert one == task.generate(3, 60, "heldout", styles=[style])
        assert [(e.case, e.outcome) for e in one] == [(e.case, e.outcome) for e in mixed]
        assert {e.style for e in one} == {style}
        assert all(e.external_id.endswith(f"-{style}") for e in one)


def test_default_generation_mixes_the_seen_styles_only() -> None:
    for split in ("train", "validation", "heldout"):
        styles = [e.style for e in task.generate(1, 400, split)]
        assert set(styles) == set(task.SEEN_STYLES), split
    for item in task.ingest_items(1, 100):
        assert item["metadata"]["style"] in task.SEEN_STYLES
        assert item["messages"][1]["content"].startswith(
            task.render(task.Case(**item["metadata"]["case"]), item["metadata"]["style"]))


def test_unseen_style_is_refused_outside_heldout() -> None:
    for split in ("train", "validation"):
        with pytest.raises(ValueError, match="unseen"):
            task.generate(0, 5, split, styles=[task.UNSEEN_STYLE])
    with pytest.raises(ValueError, match="styles"):
        task.generate(0, 5, "heldout", styles=["haiku"])


def test_validation_split_is_its_own_stream() -> None:
    val = {e.case for e in task.generate(2, 100, "validation")}
    assert val.isdisjoint({e.case for e in task.generate(2, 100, "heldout")})
    assert val.isdisjoint({e.case for e in task.generate(2, 100, "train")})


def test_corpus_digest_changes_with_the_styles() -> None:
    seen = task.corpus_digest()
    assert seen == task.corpus_digest(task.SEEN_STYLES)
    assert seen != task.corpus_digest(task.STYLES)
    assert seen != task.corpus_digest(task.SEEN_STYLES[:-1])
