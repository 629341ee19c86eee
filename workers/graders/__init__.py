"""Graders turn (prompt, completion, outcome) into a reward and a parse flag."""

from workers.graders.base import (
    Grader,
    GradeResult,
    GraderSpecError,
    MissingOutcomeError,
    get_grader,
    register_grader,
)
from workers.graders.contract import ContractGrader, parse_answer

register_grader("contract", ContractGrader)

__all__ = [
    "ContractGrader",
    "GradeResult",
    "Grader",
    "GraderSpecError",
    "MissingOutcomeError",
    "get_grader",
    "parse_answer",
    "register_grader",
]
