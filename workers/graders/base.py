"""The grader contract and a small registry keyed by the policy's grader spec.

A policy stores a grader spec such as ``{"kind": "contract", "outcome": "pfs_gt_180d",
"unparseable_reward": -1.0}``; ``get_grader(spec)`` turns it into a ``Grader``. Every reward is
stored with ``grader.version`` so a changed grader never silently mixes with old scores.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class GradeResult:
    reward: float
    parse_ok: bool
    detail: str | None = None


class GraderSpecError(ValueError):
    """The grader spec names an unknown kind or carries invalid options."""


class MissingOutcomeError(ValueError):
    """A parseable completion cannot be scored because the trace has no outcome yet."""


@runtime_checkable
class Grader(Protocol):
    version: str

    def grade(
        self,
        prompt_messages: list[dict[str, str]],
        completion_text: str,
        outcome: Mapping[str, Any] | None,
    ) -> GradeResult: ...


GraderFactory = Callable[..., Grader]
_REGISTRY: dict[str, GraderFactory] = {}
ENTRY_POINT_GROUP = "tracelearn.graders"


def register_grader(kind: str, factory: GraderFactory) -> None:
    _REGISTRY[kind] = factory


def _factory_for(kind: str) -> GraderFactory:
    if kind in _REGISTRY:
        return _REGISTRY[kind]
    # Third-party graders plug in through the package entry-point group without code changes here.
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == kind:
            factory: GraderFactory = ep.load()
            _REGISTRY[kind] = factory
            return factory
    raise GraderSpecError(f"unknown grader kind {kind!r}; known: {sorted(_REGISTRY)}")


def get_grader(spec: Mapping[str, Any]) -> Grader:
    """Build a grader from a spec dict: ``kind`` selects the class, the other keys are options."""
    if "kind" not in spec:
        raise GraderSpecError("grader spec needs a 'kind'")
    options = {k: v for k, v in spec.items() if k != "kind"}
    factory = _factory_for(str(spec["kind"]))
    try:
        return factory(**options)
    except TypeError as exc:
        raise GraderSpecError(f"bad options for grader {spec['kind']!r}: {exc}") from exc


def outcome_value(outcome: Mapping[str, Any] | None, name: str) -> Any | None:
    """Outcome ``name`` from ``{"name": n, "value": v}`` or ``{n: v}``; None if absent."""
    if outcome is None:
        return None
    if "name" in outcome and "value" in outcome:
        return outcome["value"] if outcome["name"] == name else None
    return outcome.get(name)
