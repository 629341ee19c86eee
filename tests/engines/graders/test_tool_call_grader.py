"""The tool-call grader: the expected function, arguments as a subset, every shape a model writes."""

from __future__ import annotations

import pytest

from workers.graders import GraderSpecError, MissingOutcomeError, get_grader
from workers.graders.tool_call import tool_calls

EXPECTED = {"tool_call": {"name": "lookup_ecog", "arguments": {"id": 7}}}


@pytest.mark.parametrize(
    "text",
    [
        '[{"name": "lookup_ecog", "arguments": {"id": 7}}]',  # the shape regeneration asks for
        'Let me check.\n<tool_call>{"name": "lookup_ecog", "arguments": {"id": 7}}</tool_call>',
        '```json\n{"type": "function", "function": {"name": "lookup_ecog", '
        '"arguments": "{\\"id\\": 7, \\"units\\": \\"ecog\\"}"}}\n```',  # OpenAI shape, extra arg
        '{"tool_calls": [{"function": {"name": "other", "arguments": "{}"}}, '
        '{"function": {"name": "lookup_ecog", "arguments": "{\\"id\\": 7}"}}]}',  # any of several
    ],
)
def test_a_call_to_the_expected_function_with_its_arguments_is_correct(text: str) -> None:
    r = get_grader({"kind": "tool_call"}).grade([], text, EXPECTED)
    assert (r.reward, r.parse_ok, r.detail) == (1.0, True, "correct")


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ('[{"name": "lookup_ecog", "arguments": {"id": 8}}]', "wrong arguments"),
        ('[{"name": "lookup_ecog", "arguments": {}}]', "wrong arguments"),
        ('[{"name": "lookup_stage", "arguments": {"id": 7}}]', "wrong function"),
    ],
)
def test_a_wrong_call_is_wrong_and_parsed(text: str, detail: str) -> None:
    r = get_grader({"kind": "tool_call"}).grade([], text, EXPECTED)
    assert (r.reward, r.parse_ok, r.detail) == (0.0, True, detail)


@pytest.mark.parametrize("text", ["YES", "", '{"answer": "YES"}', "[1, 2]", '{"name": 3}'])
def test_no_call_is_unparseable(text: str) -> None:
    r = get_grader({"kind": "tool_call", "unparseable_reward": -0.5}).grade([], text, EXPECTED)
    assert (r.reward, r.parse_ok) == (-0.5, False)


def test_the_expectation_comes_from_the_outcome_else_the_spec() -> None:
    call = '[{"name": "lookup_ecog", "arguments": {"id": 7, "x": 1}}]'
    by_name = get_grader({"kind": "tool_call", "outcome": "fn"})
    assert by_name.grade([], call, {"name": "fn", "value": "lookup_ecog"}).reward == 1.0
    assert by_name.grade([], call, {"fn": "lookup_stage"}).reward == 0.0
    with pytest.raises(MissingOutcomeError):
        by_name.grade([], call, None)
    fixed = get_grader({"kind": "tool_call", "name": "lookup_ecog", "arguments": {"id": 7}})
    assert fixed.grade([], call, None).reward == 1.0
    exact = get_grader({"kind": "tool_call", "name": "lookup_ecog", "arguments": {"id": 7},
                        "exact_arguments": True})
    assert exact.grade([], call, None).detail == "wrong arguments"
    # arguments given as OpenAI's JSON string in the outcome
    assert fixed.grade([], call, {"tool_call": {"name": "lookup_ecog",
                                                "arguments": '{"x": 1}'}}).reward == 1.0
    assert fixed.version != exact.version != by_name.version


def test_bad_options_are_spec_errors() -> None:
    with pytest.raises(GraderSpecError):
        get_grader({"kind": "tool_call", "arguments": [1]})
    with pytest.raises(GraderSpecError):
        get_grader({"kind": "tool_call", "nmae": "x"})


def test_tool_calls_finds_every_call_in_order_and_skips_nested_values() -> None:
    text = ('first {"name": "a", "arguments": {"q": {"name": "inner"}}} then '
            '[{"function": {"name": "b", "arguments": ""}}]')
    assert tool_calls(text) == [("a", {"q": {"name": "inner"}}), ("b", {})]
