"""The promotion gate: does a candidate's evaluation justify asking a human to approve it?

``decide`` is pure: metric dictionaries, the paired comparison and the policy's gate in, a decision
with every failed reason out. The checks are the policy's ``gate`` (``app.policies.schemas.GateSpec``,
where each default is documented).
``apply_gate`` records the decision: candidate → evaluated → awaiting_approval or rejected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from app.models import Evaluation, Policy, Snapshot, SnapshotStatus
from app.policies.schemas import GateSpec
from app.snapshots.state import transition

GATED_METRICS = ("correct", "mean_reward", "parse_rate")
# Thresholds are inclusive; the tolerance keeps 0.90 − 0.85 ≤ 0.05 true in floating point.
EPS = 1e-9


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    """Why it failed (empty when it passed)."""
    checks: dict[str, Any] = field(default_factory=dict)
    """The numbers each check compared, for the dashboard and the audit log."""
    rows: list[dict[str, Any]] = field(default_factory=list)
    """Every threshold of the gate, in words, as ``{check, threshold, value, verdict}`` with
    verdict ``pass``, ``fail`` or ``off`` (an opt-in threshold the policy does not set)."""


def _row(check: str, threshold: str, value: str, passed: bool | None) -> dict[str, Any]:
    verdict = "off" if passed is None else "pass" if passed else "fail"
    return {"check": check, "threshold": threshold, "value": value, "verdict": verdict}


def _value(metrics: Mapping[str, Any], name: str) -> float:
    """A metric's point value from either ``{"value": v, ...}`` or a bare number."""
    raw = metrics.get(name)
    if isinstance(raw, Mapping):
        raw = raw.get("value")
    if raw is None:
        raise KeyError(f"metric {name!r} is missing from the evaluation")
    return float(raw)


def relative_gain(candidate: float, champion: float) -> float:
    """(candidate − champion) / |champion|; a gain from exactly zero counts as infinite."""
    gain = candidate - champion
    if champion == 0:
        return 0.0 if gain == 0 else (float("inf") if gain > 0 else float("-inf"))
    return gain / abs(champion)


def decide(
    gate: Mapping[str, Any],
    candidate: Mapping[str, Any],
    champion: Mapping[str, Any],
    n: int,
    paired: Mapping[str, Any] | None = None,
) -> GateDecision:
    """Apply every check of the policy's gate (``GateSpec``: defaults filled in); the candidate
    passes only if none fails. ``paired``: metric → {diff, ci_low, ci_high, p_value} of the
    candidate − champion paired bootstrap."""
    g = GateSpec.model_validate(dict(gate))
    primary = g.primary_metric
    reasons: list[str] = []
    rows: list[dict[str, Any]] = []
    checks: dict[str, Any] = {"n": n, "primary_metric": primary}

    rows.append(_row("held-out prompts evaluated", f"≥ {g.min_eval_n}", str(n),
                     n >= g.min_eval_n))
    if n < g.min_eval_n:
        reasons.append(f"eval n {n} is below the minimum {g.min_eval_n}")

    parse = _value(candidate, "parse_rate")
    checks["parse_rate"] = parse
    floor_ok = None if g.min_parse_rate is None else parse >= g.min_parse_rate - EPS
    rows.append(_row("parse rate (absolute floor)",
                     "not set (opt-in)" if g.min_parse_rate is None
                     else f"≥ {g.min_parse_rate:.3f}", f"{parse:.3f}", floor_ok))
    if floor_ok is False:
        reasons.append(f"parse rate {parse:.3f} is below the minimum {g.min_parse_rate:.3f}")

    cand_p, champ_p = _value(candidate, primary), _value(champion, primary)
    gain = cand_p - champ_p
    rel = relative_gain(cand_p, champ_p)
    checks.update(
        candidate_primary=cand_p,
        champion_primary=champ_p,
        abs_gain=gain,
        # JSON (and so the audit log) has no infinity; a gain from zero is reported as null.
        rel_gain=rel if math.isfinite(rel) else None,
    )
    significance = f"{primary} gain over the champion is significant"
    if not g.require_significant_gain:
        rows.append(_row(significance, "not required", f"{gain:+.3f}", None))
    else:
        ci = (paired or {}).get(primary)
        if ci is None:
            reasons.append(f"no paired comparison of {primary} to test the gain on")
            rows.append(_row(significance, "paired 95% CI lower bound > 0",
                             "no paired comparison", False))
        else:
            low, high = float(ci["ci_low"]), float(ci["ci_high"])
            checks["primary_ci"] = [low, high]
            rows.append(_row(significance, "paired 95% CI lower bound > 0",
                             f"{gain:+.3f}, CI [{low:+.3f}, {high:+.3f}]", low > 0))
            if low <= 0:
                reasons.append(
                    f"{primary} gain {gain:+.3f} ({champ_p:.3f} → {cand_p:.3f}) is not "
                    f"significant: paired 95% CI [{low:+.3f}, {high:+.3f}] includes 0"
                )
    abs_ok = None if g.min_abs_gain is None else gain >= g.min_abs_gain - EPS
    rows.append(_row(f"{primary} gain (absolute)",
                     "not set (opt-in)" if g.min_abs_gain is None else f"≥ {g.min_abs_gain:+.3f}",
                     f"{gain:+.3f} ({champ_p:.3f} → {cand_p:.3f})", abs_ok))
    if abs_ok is False:
        reasons.append(
            f"{primary} gain {gain:+.3f} ({champ_p:.3f} → {cand_p:.3f}) is below the minimum "
            f"{g.min_abs_gain:+.3f}"
        )
    rel_ok = None if g.min_rel_gain is None else rel >= g.min_rel_gain - EPS
    rows.append(_row(f"{primary} gain (relative)",
                     "not set (opt-in)" if g.min_rel_gain is None else f"≥ {g.min_rel_gain:+.1%}",
                     f"{rel:+.1%}" if math.isfinite(rel) else "from zero", rel_ok))
    if rel_ok is False:
        reasons.append(
            f"{primary} relative gain {rel:+.1%} is below the minimum {g.min_rel_gain:+.1%}"
        )

    limit = g.max_secondary_regression
    regressions: dict[str, float] = {}
    for name in GATED_METRICS:
        if name == primary:
            continue
        drop = _value(champion, name) - _value(candidate, name)
        regressions[name] = drop
        rows.append(_row(f"{name} change vs the champion", f"≥ {-limit:+.3f}",
                         f"{-drop:+.3f}", drop <= limit + EPS))
        if drop > limit + EPS:
            reasons.append(f"{name} regressed by {drop:.3f}, more than the allowed {limit:.3f}")
    checks["secondary_regressions"] = regressions
    return GateDecision(passed=not reasons, reasons=reasons, checks=checks, rows=rows)


def apply_gate(
    session: Session, snapshot: Snapshot, evaluation: Evaluation, *, actor: str
) -> GateDecision:
    """Gate a freshly evaluated candidate and move it on; the evaluation row keeps the verdict."""
    policy = session.get(Policy, snapshot.policy_id)
    assert policy is not None
    champion = evaluation.comparison.get("champion", {})
    decision = decide(policy.gate or {}, evaluation.metrics, champion, evaluation.n,
                      evaluation.comparison.get("paired"))
    evaluation.gate_passed = decision.passed
    evaluation.gate_reasons = decision.reasons
    # The rows as decided: the policy's gate may change later, the verdict on this page may not.
    evaluation.comparison = dict(evaluation.comparison) | {"gate_rows": decision.rows}
    if snapshot.status is SnapshotStatus.candidate:
        transition(
            session,
            snapshot,
            SnapshotStatus.evaluated,
            actor=actor,
            reason=f"evaluation {evaluation.id} on {evaluation.dataset} (n={evaluation.n})",
            tenant=policy.tenant,
        )
    if decision.passed:
        transition(
            session,
            snapshot,
            SnapshotStatus.awaiting_approval,
            actor=actor,
            reason="passed the gate",
            tenant=policy.tenant,
            extra={"gate": decision.checks},
        )
    else:
        transition(
            session,
            snapshot,
            SnapshotStatus.rejected,
            actor=actor,
            reason="gate: " + "; ".join(decision.reasons),
            tenant=policy.tenant,
            extra={"gate": decision.checks},
        )
    return decision
