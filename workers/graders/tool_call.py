"""Tool-call grader: does the completion call the expected function, with the expected arguments?

Grader spec::

    {"kind": "tool_call", "outcome": "tool_call", "name": "get_weather",
     "arguments": {"city": "Paris"}, "correct_reward": 1.0, "wrong_reward": 0.0,
     "unparseable_reward": -1.0}

The expectation is the trace's outcome ``outcome`` when it has one — a function name, or
``{"name": ..., "arguments": {...}}`` (arguments as a mapping or a JSON string) — else the spec's
``name`` / ``arguments``; with neither, a parseable completion cannot be scored
(``MissingOutcomeError``). ``arguments`` match as a subset: every expected key must be present
with an equal value (extra arguments are allowed unless ``exact_arguments``).

A completion's tool calls are the JSON values in its text (whole, fenced, in ``<tool_call>`` tags
or in prose) shaped as ``{"name", "arguments"}``, OpenAI's ``{"function": {...}}`` or a list of
those — the shape regeneration asks for (``workers/inference/chat.py::tools_block``) and that
tool-trained chat templates emit. No call found: ``unparseable_reward``, parse_ok False; a call
to the expected function with matching arguments (any of several): ``correct_reward``; else
``wrong_reward``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

from workers.graders.base import (
    GradeResult,
    GraderSpecError,
    MissingOutcomeError,
    outcome_value,
    register_grader,
)

TOOL_CALL_VERSION = "tool_call-1.0"


def _arguments(raw: Any) -> Any:
    """Arguments as a mapping: OpenAI sends them as a JSON string."""
    if isinstance(raw, str):
        try:
            return json.loads(raw) if raw.strip() else {}
        except ValueError:
            return raw
    return {} if raw is None else raw


def _calls_in(value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, list):
        for item in value:
            yield from _calls_in(item)
    elif isinstance(value, dict):
        if isinstance(value.get("function"), dict):
            yield from _calls_in(value["function"])
        elif isinstance(value.get("tool_calls"), list):
            yield from _calls_in(value["tool_calls"])
        elif isinstance(value.get("name"), str):
            yield value["name"], _arguments(value.get("arguments", value.get("parameters")))


def tool_calls(text: str) -> list[tuple[str, Any]]:
    """Every (function name, arguments) the text calls, in order."""
    decoder = json.JSONDecoder()
    calls: list[tuple[str, Any]] = []
    pos = 0
    for m in re.finditer(r"[{\[]", text):
        if m.start() < pos:  # inside a value already decoded
            continue
        try:
            value, end = decoder.raw_decode(text, m.start())
        except ValueError:
            continue
        found = list(_calls_in(value))
        if found:
            calls.extend(found)
            pos = end
    return calls


class ToolCallGrader:
    def __init__(
        self,
        outcome: str = "tool_call",
        name: str | None = None,
        arguments: Mapping[str, Any] | None = None,
        exact_arguments: bool = False,
        correct_reward: float = 1.0,
        wrong_reward: float = 0.0,
        unparseable_reward: float = -1.0,
    ) -> None:
        if arguments is not None and not isinstance(arguments, Mapping):
            raise GraderSpecError("tool_call 'arguments' must be an object")
        self.outcome, self.name = outcome, name
        self.arguments = dict(arguments) if arguments is not None else None
        self.exact_arguments = bool(exact_arguments)
        self.rewards = (float(correct_reward), float(wrong_reward), float(unparseable_reward))
        # Everything that changes a score is in the version, so scores never mix silently.
        self.version = (
            f"{TOOL_CALL_VERSION};outcome={outcome};name={name or ''};"
            f"args={json.dumps(self.arguments, sort_keys=True) if self.arguments else ''};"
            f"exact={int(self.exact_arguments)};"
            f"r={self.rewards[0]:g},{self.rewards[1]:g},{self.rewards[2]:g}"
        )

    def expected(self, outcome: Mapping[str, Any] | None) -> tuple[str, Any]:
        truth = outcome_value(outcome, self.outcome)
        if isinstance(truth, str) and truth:
            return truth, self.arguments
        if isinstance(truth, Mapping) and isinstance(truth.get("name"), str):
            args = truth.get("arguments")
            return truth["name"], self.arguments if args is None else _arguments(args)
        if self.name:
            return self.name, self.arguments
        raise MissingOutcomeError(
            f"outcome {self.outcome!r} missing and no 'name' in the spec; cannot score the call")

    def matches(self, got: Any, want: Any) -> bool:
        if want is None:
            return True
        if not isinstance(want, Mapping) or not isinstance(got, Mapping):
            return bool(got == want)
        if self.exact_arguments:
            return dict(got) == dict(want)
        return all(k in got and got[k] == v for k, v in want.items())

    def grade(
        self,
        prompt_messages: list[dict[str, str]],
        completion_text: str,
        outcome: Mapping[str, Any] | None,
    ) -> GradeResult:
        correct, wrong, unparseable = self.rewards
        calls = tool_calls(completion_text)
        if not calls:
            return GradeResult(unparseable, False, "no tool call")
        name, args = self.expected(outcome)
        if any(n == name and self.matches(a, args) for n, a in calls):
            return GradeResult(correct, True, "correct")
        if any(n == name for n, _ in calls):
            return GradeResult(wrong, True, "wrong arguments")
        return GradeResult(wrong, True, "wrong function")


register_grader("tool_call", ToolCallGrader)
