"""Contract grader: the last non-empty line must be exactly ``ANSWER: YES`` or ``ANSWER: NO``.

Reward: ``correct_reward`` (1) when the parsed answer equals the boolean outcome, ``wrong_reward``
(0) when parseable but wrong, ``unparseable_reward`` (−1) otherwise. The heavy penalty for breaking
the contract is deliberate: a production consumer cannot use an answer it cannot parse.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from workers.graders.base import GradeResult, MissingOutcomeError, outcome_value

_CONTRACT = re.compile(r"^ANSWER: (YES|NO)$")
CONTRACT_VERSION = "contract-1.0"


def parse_answer(text: str) -> bool | None:
    """YES → True, NO → False, anything else (including a missing or decorated line) → None."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    match = _CONTRACT.match(lines[-1])
    if match is None:
        return None
    return match.group(1) == "YES"


class ContractGrader:
    def __init__(
        self,
        outcome: str = "pfs_gt_180d",
        correct_reward: float = 1.0,
        wrong_reward: float = 0.0,
        unparseable_reward: float = -1.0,
    ) -> None:
        self.outcome = outcome
        self.correct_reward = float(correct_reward)
        self.wrong_reward = float(wrong_reward)
        self.unparseable_reward = float(unparseable_reward)
        # Rewards are part of the version so changed reward scales never mix silently.
        self.version = (
            f"{CONTRACT_VERSION};outcome={outcome};"
            f"r={self.correct_reward:g},{self.wrong_reward:g},{self.unparseable_reward:g}"
        )

    def grade(
        self,
        prompt_messages: list[dict[str, str]],
        completion_text: str,
        outcome: Mapping[str, Any] | None,
    ) -> GradeResult:
        answer = parse_answer(completion_text)
        if answer is None:
            return GradeResult(self.unparseable_reward, False, "unparseable")
        truth = outcome_value(outcome, self.outcome)
        if truth is None:
            raise MissingOutcomeError(f"outcome {self.outcome!r} missing; cannot score the answer")
        if answer == bool(truth):
            return GradeResult(self.correct_reward, True, "correct")
        return GradeResult(self.wrong_reward, True, "wrong")
