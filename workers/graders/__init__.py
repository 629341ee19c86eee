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
from workers.graders.judge import JudgeGrader
from workers.graders.match import MatchGrader
from workers.graders.tool_call import ToolCallGrader

# Every built-in kind is known once the package is imported; match and judge register their
# kinds (match, exact, regex, json_field, judge,
# tool_call) as their modules load.
register_grader("contract", ContractGrader)

__all__ = [
    "ContractGrader",
    "GradeResult",
    "Grader",
    "GraderSpecError",
    "JudgeGrader",
    "MatchGrader",
    "MissingOutcomeError",
    "ToolCallGrader",
    "get_grader",
    "parse_answer",
    "register_grader",
]
