"""The eval job: a candidate against the serving champion on the policy's held-out traces.

For every held-out prompt both snapshots sample ``k`` completions with the *same* seed, and the
policy's grader scores them. Per snapshot (95% bootstrap CIs over prompts):

* ``parse_rate``   share of samples that honour the output contract
* ``correct``      end-to-end correctness: the first sample's answer against the outcome
* ``mean_reward``  mean grader reward over all samples
* ``pass@k``       unbiased pass@k (Chen et al. 2021) for k in {1, 4, G}

and paired against the champion: a paired bootstrap of each metric's per-prompt difference and an
exact McNemar test on first-sample correctness. A breakdown by one metadata key, the reward
histograms and examples where the two disagree are stored with the numbers.

``evaluate_pair`` is pure (backend, items, grader in; report out). ``evaluate_snapshot`` loads the
rows, runs it, stores an ``Evaluation`` and applies the gate. No web or task framework here: the
API, the Celery task, the CLI and the demo all call these.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from app.db import session_scope
from app.engines import adapter_for, backend_for
from app.jobs.service import JobContext, PermanentJobError
from app.models import Evaluation, Policy, Snapshot, SnapshotStatus, Split, Trace
from app.observability import ops
from app.policies.service import grader as policy_grader
from app.policies.service import sampling_params
from app.settings import Settings, get_settings
from app.snapshots.gate import apply_gate
from workers.evaluation.metrics import bootstrap_ci, pass_at_k
from workers.evaluation.paired import mcnemar_exact, paired_bootstrap
from workers.graders import Grader, GradeResult, MissingOutcomeError
from workers.inference.base import AdapterRef, InferenceBackend, SamplingParams
from workers.inference.chat import flatten_messages, with_tools

log = logging.getLogger(__name__)

DATASET_HELDOUT = "heldout"
PAIRED_METRICS = ("correct", "parse_rate", "mean_reward")
MAX_EXAMPLES = 12


class EvaluationError(ValueError):
    """The snapshot cannot be evaluated as asked (no held-out data, no champion)."""


@dataclass(frozen=True)
class EvalItem:
    """One held-out prompt with what the grader needs."""

    prompt_id: str
    messages: list[dict[str, str]]
    outcome: dict[str, Any] | None
    metadata: dict[str, Any] = field(default_factory=dict)
    prompt: list[dict[str, Any]] | None = None
    """What the sampler is given: the trace's messages with its tools (``with_tools``), rendered
    exactly as regeneration renders them; None: ``messages``. Graders read ``messages``."""


@dataclass(frozen=True)
class EvalOptions:
    k: int | None = None
    """Samples per prompt; None: the policy's group size G."""
    max_items: int = 200
    """At most this many held-out prompts (the oldest first, so reruns see the same set)."""
    breakdown_key: str | None = None
    """Metadata key, dotted for nesting (``case.biomarker``)."""
    seed: int = 0
    max_tokens: int | None = None
    """None: the policy's sampling max_tokens."""
    n_boot: int = 1000


@dataclass(frozen=True)
class SampleScore:
    text: str
    reward: float
    parse_ok: bool
    correct: bool


@dataclass(frozen=True)
class ItemScores:
    item: EvalItem
    samples: list[SampleScore]

    @property
    def parse_rate(self) -> float:
        return sum(s.parse_ok for s in self.samples) / len(self.samples)

    @property
    def mean_reward(self) -> float:
        return sum(s.reward for s in self.samples) / len(self.samples)

    @property
    def first_correct(self) -> bool:
        return self.samples[0].correct

    @property
    def n_correct(self) -> int:
        return sum(s.correct for s in self.samples)


@dataclass
class EvalReport:
    n: int
    k: int
    candidate: dict[str, dict[str, float]]
    champion: dict[str, dict[str, float]]
    paired: dict[str, dict[str, float]]
    mcnemar: dict[str, float]
    breakdown: dict[str, Any]
    examples: list[dict[str, Any]]
    reward_hist: dict[str, list[list[float]]]


def is_correct(result: GradeResult) -> bool:
    """Graders that report correct/wrong say so in ``detail``; others count a positive reward on
    a parseable answer as correct."""
    if result.detail in ("correct", "wrong"):
        return result.detail == "correct"
    return result.parse_ok and result.reward > 0


def score(
    backend: InferenceBackend,
    items: Sequence[EvalItem],
    adapter: AdapterRef | None,
    k: int,
    params: SamplingParams,
    grader: Grader,
) -> list[ItemScores]:
    """Sample ``k`` completions per item with ``adapter`` and grade every one."""
    outs = backend.generate([it.prompt or it.messages for it in items], k, params, adapter)
    scored = []
    for item, completions in zip(items, outs, strict=True):
        samples = []
        for c in completions:
            g = grader.grade(item.messages, c.text, item.outcome)
            samples.append(SampleScore(c.text, g.reward, g.parse_ok, is_correct(g)))
        scored.append(ItemScores(item, samples))
    return scored


def _interval(values: Sequence[float], n_boot: int, seed: int) -> dict[str, float]:
    low, high = bootstrap_ci(list(values), n_boot=n_boot, seed=seed)
    return {"value": sum(values) / len(values), "ci_low": float(low), "ci_high": float(high)}


def pass_ks(k: int, group_size: int) -> list[int]:
    return sorted({x for x in (1, 4, group_size) if 1 <= x <= k})


def per_prompt(scores: Sequence[ItemScores], metric: str) -> list[float]:
    if metric == "correct":
        return [float(s.first_correct) for s in scores]
    if metric == "parse_rate":
        return [s.parse_rate for s in scores]
    if metric == "mean_reward":
        return [s.mean_reward for s in scores]
    raise KeyError(metric)


def summarize(
    scores: Sequence[ItemScores], ks: Sequence[int], n_boot: int, seed: int
) -> dict[str, dict[str, float]]:
    """Every metric as {value, ci_low, ci_high}; CIs resample prompts, not samples."""
    out = {m: _interval(per_prompt(scores, m), n_boot, seed) for m in PAIRED_METRICS}
    for kk in ks:
        values = [pass_at_k(len(s.samples), s.n_correct, kk) for s in scores]
        out[f"pass@{kk}"] = _interval(values, n_boot, seed)
    return out


def metadata_value(metadata: Mapping[str, Any], key: str) -> str:
    node: Any = metadata
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return "(missing)"
        node = node[part]
    return str(node)


def breakdown(
    candidate: Sequence[ItemScores], champion: Sequence[ItemScores], key: str | None
) -> dict[str, Any]:
    if not key:
        return {}
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(candidate):
        groups[metadata_value(s.item.metadata, key)].append(i)
    rows: dict[str, Any] = {}
    for value, idx in sorted(groups.items()):
        row: dict[str, Any] = {"n": len(idx)}
        for name, scores in (("candidate", candidate), ("champion", champion)):
            subset = [scores[i] for i in idx]
            row[name] = {m: sum(per_prompt(subset, m)) / len(subset) for m in PAIRED_METRICS}
        rows[value] = row
    return {"key": key, "groups": rows}


def _last_user(messages: Sequence[Mapping[str, str]]) -> str:
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return (users[-1] if users else str(messages[-1].get("content", "")))[:2000]


def _sample_view(s: SampleScore) -> dict[str, Any]:
    return {"text": s.text[:4000], "reward": s.reward, "correct": s.correct,
            "parse_ok": s.parse_ok}


def disagreements(
    candidate: Sequence[ItemScores], champion: Sequence[ItemScores], limit: int = MAX_EXAMPLES
) -> list[dict[str, Any]]:
    """Prompts where the first samples disagree on correctness (then on parsing)."""
    picked = []
    for cand, champ in zip(candidate, champion, strict=True):
        a, b = cand.samples[0], champ.samples[0]
        if a.correct == b.correct and a.parse_ok == b.parse_ok:
            continue
        picked.append(
            {
                "prompt_id": cand.item.prompt_id,
                "prompt": _last_user(cand.item.messages),
                "outcome": cand.item.outcome,
                "candidate": _sample_view(a),
                "champion": _sample_view(b),
                "winner": "candidate" if a.reward > b.reward else "champion",
                "flipped": a.correct != b.correct,
            }
        )
    # Correctness flips first: they are what a reviewer must see.
    picked.sort(key=lambda e: not e["flipped"])
    return picked[:limit]


def reward_histogram(rewards: Sequence[float], bins: int = 10) -> list[list[float]]:
    """[[value, count], ...] for discrete rewards; [[bin_low, count], ...] for continuous ones."""
    if not rewards:
        return []
    distinct = Counter(round(r, 6) for r in rewards)
    if len(distinct) <= 12:
        return [[v, float(c)] for v, c in sorted(distinct.items())]
    lo, hi = min(rewards), max(rewards)
    width = (hi - lo) / bins or 1.0
    counts = Counter(min(bins - 1, int((r - lo) / width)) for r in rewards)
    return [[lo + i * width, float(counts.get(i, 0))] for i in range(bins)]


def evaluate_pair(
    backend: InferenceBackend,
    items: Sequence[EvalItem],
    candidate: AdapterRef | None,
    champion: AdapterRef | None,
    grader: Grader,
    *,
    k: int,
    group_size: int,
    params: SamplingParams,
    breakdown_key: str | None = None,
    n_boot: int = 1000,
    progress: Callable[[str], None] | None = None,
) -> EvalReport:
    """Score both snapshots on ``items`` with identical seeds and compare them."""
    if not items:
        raise ValueError("no evaluation items")
    if progress:
        progress("sampling the candidate")
    cand = score(backend, items, candidate, k, params, grader)
    if progress:
        progress("sampling the champion")
    champ = score(backend, items, champion, k, params, grader)
    ks = pass_ks(k, group_size)
    seed = params.seed or 0
    paired = {}
    for metric in PAIRED_METRICS:
        r = paired_bootstrap(
            per_prompt(cand, metric), per_prompt(champ, metric), n_boot=n_boot, seed=seed
        )
        paired[metric] = {"diff": r.diff, "ci_low": r.ci_low, "ci_high": r.ci_high,
                          "p_value": r.p_value}
    mc = mcnemar_exact([s.first_correct for s in cand], [s.first_correct for s in champ])
    return EvalReport(
        n=len(items),
        k=k,
        candidate=summarize(cand, ks, n_boot, seed),
        champion=summarize(champ, ks, n_boot, seed),
        paired=paired,
        mcnemar={"candidate_only": mc.candidate_only, "champion_only": mc.champion_only,
                 "p_value": mc.p_value},
        breakdown=breakdown(cand, champ, breakdown_key),
        examples=disagreements(cand, champ),
        reward_hist={
            "candidate": reward_histogram([x.reward for s in cand for x in s.samples]),
            "champion": reward_histogram([x.reward for s in champ for x in s.samples]),
        },
    )


# --- the job: rows in, an Evaluation row out ---------------------------------------------------


def heldout_items(
    session: Session, policy: Policy, max_items: int
) -> tuple[list[EvalItem], int]:
    """Held-out traces that have the outcome the grader needs; also how many lacked it."""
    outcome_name = str((policy.grader_spec or {}).get("outcome", ""))
    traces = session.scalars(
        select(Trace)
        .where(Trace.policy_id == policy.id, Trace.split == Split.heldout,
               Trace.trainable.is_(True))
        .options(selectinload(Trace.outcomes))
        .order_by(Trace.id)
    )
    items: list[EvalItem] = []
    skipped = 0
    for t in traces:
        outcomes = {o.name: o.value for o in t.outcomes}
        if outcome_name and outcome_name not in outcomes:
            skipped += 1
            continue
        items.append(EvalItem(
            t.external_id, flatten_messages(t.messages), outcomes or None, dict(t.meta or {}),
            prompt=with_tools(t.messages, (t.request or {}).get("tools"))))
        if len(items) >= max_items:
            break
    return items, skipped


@dataclass(frozen=True)
class EvalPlan:
    """Everything an evaluation needs, read in one short transaction; running it needs none."""

    snapshot_id: int
    served_name: str
    champion_id: int
    champion_served_name: str
    base_model: str
    candidate: AdapterRef | None
    champion: AdapterRef | None
    items: list[EvalItem]
    skipped: int
    k: int
    group_size: int
    params: SamplingParams
    grader: Grader
    options: EvalOptions


def plan_evaluation(session: Session, snapshot_id: int, options: EvalOptions) -> EvalPlan | Evaluation:
    """The plan for evaluating a candidate, or its stored evaluation when the work is done (a
    re-delivered job). Reads only."""
    snapshot = session.get(Snapshot, snapshot_id)
    if snapshot is None:
        raise EvaluationError(f"no snapshot with id {snapshot_id}")
    if snapshot.status is not SnapshotStatus.candidate:
        # A re-delivered eval job finds its work done: the gate already moved the snapshot on.
        done = session.scalar(
            select(Evaluation).where(Evaluation.snapshot_id == snapshot.id)
            .order_by(Evaluation.id.desc()).limit(1)
        )
        if done is not None:
            return done
    policy = snapshot.policy
    champion = session.get(Snapshot, policy.serving_snapshot_id or -1)
    if champion is None:
        raise EvaluationError(
            f"policy {policy.name!r} has no serving snapshot to compare against"
        )
    items, skipped = heldout_items(session, policy, options.max_items)
    if not items:
        raise EvaluationError(
            f"policy {policy.name!r} has no held-out traces with outcomes to evaluate on"
        )
    return EvalPlan(
        snapshot_id=snapshot.id,
        served_name=snapshot.served_name,
        champion_id=champion.id,
        champion_served_name=champion.served_name,
        base_model=policy.base_model,
        candidate=adapter_for(snapshot),
        champion=adapter_for(champion),
        items=items,
        skipped=skipped,
        k=options.k or policy.group_size,
        group_size=policy.group_size,
        params=sampling_params(policy, seed=options.seed, max_tokens=options.max_tokens),
        grader=policy_grader(policy),
        options=options,
    )


def run_evaluation(
    plan: EvalPlan,
    backend: InferenceBackend,
    progress: Callable[[str], None] | None = None,
) -> EvalReport:
    """Sample and grade both snapshots (minutes of inference; no database involved)."""
    try:
        return evaluate_pair(
            backend,
            plan.items,
            plan.candidate,
            plan.champion,
            plan.grader,
            k=plan.k,
            group_size=plan.group_size,
            params=plan.params,
            breakdown_key=plan.options.breakdown_key,
            n_boot=plan.options.n_boot,
            progress=progress,
        )
    except MissingOutcomeError as exc:  # items are filtered on outcomes; a grader may want more
        raise EvaluationError(str(exc)) from exc


def record_evaluation(
    session: Session, plan: EvalPlan, report: EvalReport, *, actor: str
) -> Evaluation:
    """Store the evaluation and apply the gate — a short write transaction. The row is stored
    even when the gate rejects the candidate: the numbers explain why."""
    snapshot = session.get(Snapshot, plan.snapshot_id)
    if snapshot is None:
        raise EvaluationError(f"snapshot {plan.snapshot_id} is gone")
    row = Evaluation(
        snapshot_id=plan.snapshot_id,
        champion_snapshot_id=plan.champion_id,
        dataset=DATASET_HELDOUT,
        n=report.n,
        metrics=report.candidate,
        comparison={
            "champion": report.champion,
            "champion_served_name": plan.champion_served_name,
            "paired": report.paired,
            "mcnemar": report.mcnemar,
            "reward_hist": report.reward_hist,
            "k": report.k,
            "seed": plan.options.seed,
            "max_tokens": plan.params.max_tokens,
            "temperature": plan.params.temperature,
            "grader_version": plan.grader.version,
            "skipped_no_outcome": plan.skipped,
        },
        breakdown=report.breakdown,
        examples=report.examples,
    )
    session.add(row)
    session.flush()
    verdict = None
    if snapshot.status is SnapshotStatus.candidate:
        verdict = apply_gate(session, snapshot, row, actor=actor)
    session.flush()
    ops.info("evaluation.done", snapshot=plan.served_name, champion=plan.champion_served_name,
             n=report.n, candidate_correct=report.candidate["correct"]["value"],
             champion_correct=report.champion["correct"]["value"])
    ops.info("verdict", snapshot=plan.served_name, status=snapshot.status.value,
             reasons=verdict.reasons if verdict is not None else [])
    return row


def evaluate_snapshot(
    session: Session,
    snapshot_id: int,
    settings: Settings,
    *,
    options: EvalOptions | None = None,
    actor: str = "system:eval",
    backend: InferenceBackend | None = None,
    progress: Callable[[str], None] | None = None,
) -> Evaluation:
    """Evaluate a candidate against the policy's serving snapshot, store the row, apply the gate,
    in the caller's session (the demo and tests; the eval job uses the pieces below)."""
    plan = plan_evaluation(session, snapshot_id, options or EvalOptions())
    if isinstance(plan, Evaluation):
        return plan
    report = run_evaluation(plan, backend or backend_for(settings, plan.base_model), progress)
    return record_evaluation(session, plan, report, actor=actor)


def eval_job_key(snapshot_id: int) -> str:
    """The evaluation job of a candidate snapshot."""
    return f"eval:snapshot={snapshot_id}"


def handle_eval_job(ctx: JobContext) -> dict[str, Any]:
    """Read the plan, sample with no transaction open, then write the verdict in a short one.

    The job's lease heartbeat writes from another connection; on SQLite a transaction holding
    uncommitted writes while the heartbeat waits would lock both out (the heartbeat times out,
    the attempt fails). So nothing is written until the lease has been checked one last time.
    """
    options = EvalOptions(**{k: v for k, v in ctx.payload.get("options", {}).items()})
    actor = str(ctx.payload.get("actor") or "system:eval")
    try:
        with session_scope() as session:
            plan = plan_evaluation(session, int(ctx.payload["snapshot_id"]), options)
            if isinstance(plan, Evaluation):
                return {"evaluation_id": plan.id, "gate_passed": plan.gate_passed}
        report = run_evaluation(plan, backend_for(get_settings(), plan.base_model),
                                progress=lambda _: ctx.check())
    except EvaluationError as exc:
        # Nothing to evaluate on yet (no champion, no held-out outcomes): retrying within this
        # job cannot help; the next tick plans it again after a backoff.
        raise PermanentJobError(str(exc)) from exc
    ctx.check()
    with session_scope() as session:
        row = record_evaluation(session, plan, report, actor=actor)
        return {"evaluation_id": row.id, "gate_passed": row.gate_passed}
