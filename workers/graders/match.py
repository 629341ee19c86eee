"""Match graders: compare a completion with the trace's outcome, exactly, by regex, or by a JSON
field. Grader specs::

    {"kind": "exact", "outcome": "label"}
    {"kind": "regex", "outcome": "label", "pattern": "ANSWER: (\\w+)"}     # group 1 (or whole match)
    {"kind": "json_field", "outcome": "label", "field": "answer.value"}   # dotted path

Reward: ``correct_reward`` when the extracted value equals the outcome, ``wrong_reward`` when it
was extracted but differs, ``unparseable_reward`` when nothing could be extracted (parse_ok False).
Strings compare after stripping (and case-folding unless ``case_sensitive``); numbers compare with
``abs_tol``; booleans also match "yes"/"no"/"true"/"false".
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from workers.graders.base import (
    GradeResult,
    GraderSpecError,
    MissingOutcomeError,
    outcome_value,
    register_grader,
)

MATCH_VERSION = "match-1.0"
_TRUE = {"yes", "true", "1", "y"}
_FALSE = {"no", "false", "0", "n"}
_MISSING = object()


class MatchGrader:
    def __init__(
        self,
        mode: str = "exact",
        outcome: str = "label",
        pattern: str | None = None,
        field: str | None = None,
        case_sensitive: bool = False,
        abs_tol: float = 1e-9,
        correct_reward: float = 1.0,
        wrong_reward: float = 0.0,
        unparseable_reward: float = -1.0,
    ) -> None:
        if mode not in ("exact", "regex", "json_field"):
            raise GraderSpecError(f"match mode must be exact, regex or json_field, got {mode!r}")
        if mode == "regex":
            if not pattern:
                raise GraderSpecError("a regex grader needs a 'pattern'")
            try:
                self._regex: re.Pattern[str] | None = re.compile(
                    pattern, 0 if case_sensitive else re.IGNORECASE
                )
            except re.error as exc:
                raise GraderSpecError(f"bad regex {pattern!r}: {exc}") from exc
        else:
            self._regex = None
        if mode == "json_field" and not field:
            raise GraderSpecError("a json_field grader needs a 'field' (dotted path)")
        self.mode, self.outcome, self.pattern, self.field = mode, outcome, pattern, field
        self.case_sensitive, self.abs_tol = bool(case_sensitive), float(abs_tol)
        self.rewards = (float(correct_reward), float(wrong_reward), float(unparseable_reward))
        # Everything that changes a score is in the version, so scores never mix silently.
        self.version = (
            f"{MATCH_VERSION};mode={mode};outcome={outcome};pattern={pattern or ''};"
            f"field={field or ''};cs={int(self.case_sensitive)};tol={self.abs_tol:g};"
            f"r={self.rewards[0]:g},{self.rewards[1]:g},{self.rewards[2]:g}"
        )

    def extract(self, text: str) -> Any:
        """The value the completion states, or ``_MISSING``."""
        if self.mode == "exact":
            stripped = text.strip()
            return stripped if stripped else _MISSING
        if self.mode == "regex":
            assert self._regex is not None
            m = self._regex.search(text)
            if m is None:
                return _MISSING
            return (m.group(1) if m.groups() else m.group(0)).strip()
        return _json_field(text, str(self.field))

    def equal(self, got: Any, truth: Any) -> bool:
        if isinstance(truth, bool):
            if isinstance(got, bool):
                return got is truth
            return str(got).strip().lower() in (_TRUE if truth else _FALSE)
        if isinstance(truth, int | float) and not isinstance(got, bool):
            try:
                return math.isclose(float(got), float(truth), rel_tol=0.0, abs_tol=self.abs_tol)
            except (TypeError, ValueError):
                return False
        if isinstance(truth, dict | list):
            return bool(got == truth)
        a, b = str(got).strip(), str(truth).strip()
        return a == b if self.case_sensitive else a.casefold() == b.casefold()

    def grade(
        self,
        prompt_messages: list[dict[str, str]],
        completion_text: str,
        outcome: Mapping[str, Any] | None,
    ) -> GradeResult:
        got = self.extract(completion_text)
        correct, wrong, unparseable = self.rewards
        if got is _MISSING:
            return GradeResult(unparseable, False, "unparseable")
        truth = outcome_value(outcome, self.outcome)
        if truth is None:
            raise MissingOutcomeError(f"outcome {self.outcome!r} missing; cannot score the answer")
        if self.equal(got, truth):
            return GradeResult(correct, True, "correct")
        return GradeResult(wrong, True, "wrong")


def _json_field(text: str, path: str) -> Any:
    doc = _first_json_object(text)
    if doc is _MISSING:
        return _MISSING
    cur: Any = doc
    for part in path.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return _MISSING
    return cur


def _first_json_object(text: str) -> Any:
    """The whole text as JSON, else the first decodable ``{…}`` in it (models wrap JSON in prose
    or code fences)."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    decoder = json.JSONDecoder()
    for m in re.finditer(r"[{\[]", text):
        try:
            obj, _ = decoder.raw_decode(text[m.start() :])
            return obj
        except ValueError:
            continue
    return _MISSING


def _factory(mode: str) -> Any:
    def make(**options: Any) -> MatchGrader:
        return MatchGrader(mode=mode, **options)

    return make


register_grader("match", MatchGrader)
register_grader("exact", _factory("exact"))
register_grader("regex", _factory("regex"))
register_grader("json_field", _factory("json_field"))
