"""Contract grader: exact last-line contract, configurable rewards, versioned."""

from __future__ import annotations

import pytest

from workers.graders import (
    ContractGrader,
    GraderSpecError,
    MissingOutcomeError,
    get_grader,
    parse_answer,
)

MSGS = [{"role": "user", "content": "case"}]
YES = {"name": "pfs_gt_180d", "value": True}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Overall: favorable.\nANSWER: YES", True),
        ("reasoning\nANSWER: NO\n\n  ", False),
        ("  ANSWER: YES  ", True),
        ("ANSWER: YES.", None),
        ("Answer: yes", None),
        ("ANSWER: YES (low confidence)", None),
        ("ANSWER: Y", None),
        ("ANSWER: YES\nbut maybe not", None),
        ("", None),
    ],
)
def test_parse_answer_accepts_only_the_exact_last_line(text: str, expected: bool | None) -> None:
    assert parse_answer(text) is expected


def test_correct_wrong_unparseable_rewards() -> None:
    g = ContractGrader()
    assert g.grade(MSGS, "x\nANSWER: YES", YES).reward == 1.0
    wrong = g.grade(MSGS, "x\nANSWER: NO", YES)
    assert (wrong.reward, wrong.parse_ok) == (0.0, True)
    bad = g.grade(MSGS, "x\nAnswer: yes", YES)
    assert (bad.reward, bad.parse_ok) == (-1.0, False)


def test_outcome_as_plain_mapping_is_accepted() -> None:
    assert ContractGrader().grade(MSGS, "ANSWER: NO", {"pfs_gt_180d": False}).reward == 1.0


def test_unparseable_needs_no_outcome_but_parseable_does() -> None:
    g = ContractGrader()
    assert g.grade(MSGS, "no answer", None).reward == -1.0
    with pytest.raises(MissingOutcomeError):
        g.grade(MSGS, "ANSWER: YES", None)
    with pytest.raises(MissingOutcomeError):
        g.grade(MSGS, "ANSWER: YES", {"name": "other", "value": True})


def test_registry_builds_configured_grader_and_version_reflects_rewards() -> None:
    g = get_grader({"kind": "contract", "outcome": "pfs_gt_180d", "unparseable_reward": -2.0})
    assert g.grade(MSGS, "garbage", None).reward == -2.0
    assert g.version != ContractGrader().version
    assert g.version.startswith("contract-1.0")


def test_registry_rejects_unknown_kind_and_bad_options() -> None:
    with pytest.raises(GraderSpecError, match="unknown grader kind"):
        get_grader({"kind": "nope"})
    with pytest.raises(GraderSpecError, match="bad options"):
        get_grader({"kind": "contract", "colour": "red"})
    with pytest.raises(GraderSpecError, match="kind"):
        get_grader({})
