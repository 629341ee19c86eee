"""Regenerate and grade: stored traces → G completions from the serving snapshot → graded groups.

    plan_regeneration(policy)      pending train traces, chunked into rollout jobs (one per chunk)
    regenerate(trace_ids, snap)    one batched backend call per sub-batch of traces; each group and
                                   its G rollouts are written in one transaction, keyed by
                                   (trace, snapshot) so a re-run or a racing worker writes nothing
    grade_groups(group_ids)        the policy's grader on every rollout; a grader that raises or
                                   times out fails only that rollout; group statistics stored

A trace is *pending* for a policy when it is in the train split, has no group for the snapshot
now serving the policy, and (if the grader names an outcome) its outcome has arrived — grading a
completion against a label that is not there yet would only store failures.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from sqlalchemy import exists, insert, select
from sqlalchemy.orm import Session, selectinload

from app.db import session_scope, storable_text, upsert_insert, utcnow
from app.engines import adapter_for, backend_for
from app.jobs.service import JobContext, PermanentJobError, active_jobs, enqueue
from app.models import (
    GroupStatus,
    Job,
    JobKind,
    Outcome,
    Policy,
    Rollout,
    RolloutGroup,
    RolloutStatus,
    Snapshot,
    Split,
    Trace,
)
from app.observability import ops
from app.policies.service import grader as policy_grader
from app.policies.service import sampling_params
from app.settings import get_settings
from workers.graders import Grader, GradeResult
from workers.inference.base import InferenceBackend
from workers.inference.chat import with_tools
from workers.learner.losses import oapl_soft_value

log = logging.getLogger(__name__)

DEFAULT_TRACES_PER_JOB = 64
"""Traces per rollout job: the unit of retry (a crashed job redoes at most this many)."""
DEFAULT_TRACES_PER_CALL = 16
"""Traces per backend call inside a job: G x this many sequences are sampled as one batch, then
committed, so a crash loses at most one call's work."""
DEFAULT_GRADE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class PipelineOptions:
    """Pipeline knobs read from ``policy.training_config`` (next to ``min_groups``)."""

    traces_per_job: int = DEFAULT_TRACES_PER_JOB
    traces_per_call: int = DEFAULT_TRACES_PER_CALL
    grade_timeout_s: float = DEFAULT_GRADE_TIMEOUT_S
    beta1: float = 1.0

    @classmethod
    def for_policy(cls, policy: Policy) -> PipelineOptions:
        cfg = policy.training_config or {}
        return cls(
            traces_per_job=int(cfg.get("traces_per_job", DEFAULT_TRACES_PER_JOB)),
            traces_per_call=int(cfg.get("traces_per_call", DEFAULT_TRACES_PER_CALL)),
            grade_timeout_s=float(cfg.get("grade_timeout_s", DEFAULT_GRADE_TIMEOUT_S)),
            beta1=float(cfg.get("beta1", 1.0)),
        )


def _digest(values: Sequence[int]) -> str:
    return hashlib.sha256(",".join(map(str, sorted(values))).encode()).hexdigest()[:16]


def _seed(snapshot_id: int, trace_ids: Sequence[int]) -> int:
    # Deterministic per (snapshot, traces): a retried call reproduces what the lost one sampled.
    h = hashlib.sha256(f"{snapshot_id}:{_digest(trace_ids)}".encode()).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF


# --- planning ----------------------------------------------------------------------------------


def serving_snapshot(session: Session, policy: Policy) -> Snapshot:
    snapshot = session.get(Snapshot, policy.serving_snapshot_id) if policy.serving_snapshot_id else None
    if snapshot is None:
        raise PermanentJobError(f"policy {policy.name!r} has no serving snapshot")
    return snapshot


def pending_trace_ids(
    session: Session, policy: Policy, snapshot_id: int, limit: int | None = None
) -> list[int]:
    """Trainable train traces of ``policy`` with no group for ``snapshot_id`` (and their outcome
    present). Untrainable ones (image content, aborted streams…) are never regenerated."""
    has_group = exists().where(
        RolloutGroup.trace_id == Trace.id, RolloutGroup.snapshot_id == snapshot_id
    )
    query = select(Trace.id).where(
        Trace.policy_id == policy.id, Trace.split == Split.train, Trace.trainable.is_(True),
        ~has_group,
    )
    outcome_name = (policy.grader_spec or {}).get("outcome")
    if outcome_name:
        query = query.where(
            exists().where(Outcome.trace_id == Trace.id, Outcome.name == outcome_name)
        )
    query = query.order_by(Trace.id)
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))


def rollout_job_key(snapshot_id: int, trace_ids: Sequence[int]) -> str:
    return f"{rollout_job_prefix(snapshot_id)}traces={_digest(trace_ids)}"


def rollout_job_prefix(snapshot_id: int) -> str:
    """What every rollout job key of one snapshot starts with."""
    return f"rollout:snapshot={snapshot_id}:"


def grade_job_key(snapshot_id: int, group_ids: Sequence[int]) -> str:
    return f"grade:snapshot={snapshot_id}:groups={_digest(group_ids)}"


def plan_regeneration(session: Session, policy: Policy, *, limit: int | None = None) -> list[Job]:
    """Enqueue rollout jobs covering every pending trace not already in an unfinished job."""
    snapshot = serving_snapshot(session, policy)
    opts = PipelineOptions.for_policy(policy)
    covered: set[int] = set()
    for job in active_jobs(session, JobKind.rollout, rollout_job_prefix(snapshot.id)):
        covered.update(int(t) for t in job.payload.get("trace_ids", []))
    todo = [t for t in pending_trace_ids(session, policy, snapshot.id, limit) if t not in covered]
    jobs = []
    for start in range(0, len(todo), opts.traces_per_job):
        chunk = todo[start : start + opts.traces_per_job]
        jobs.append(
            enqueue(
                session,
                JobKind.rollout,
                rollout_job_key(snapshot.id, chunk),
                {"policy_id": policy.id, "snapshot_id": snapshot.id, "trace_ids": chunk},
            )
        )
    if jobs:
        ops.info("plan", policy=policy.name, snapshot=snapshot.served_name, traces=len(todo),
                 rollout_jobs=[j.id for j in jobs])
    return jobs


# --- regeneration ------------------------------------------------------------------------------


@dataclass
class RegenerateResult:
    groups_created: list[int] = field(default_factory=list)
    traces_skipped: int = 0
    completions: int = 0
    completion_tokens: int = 0
    grade_job_id: int | None = None


def regenerate(
    trace_ids: Sequence[int],
    snapshot_id: int,
    *,
    backend: InferenceBackend | None = None,
    before_write: Callable[[], None] | None = None,
    enqueue_grading: bool = True,
) -> RegenerateResult:
    """Sample G completions from ``snapshot_id`` for each trace that has no group for it yet.

    ``before_write`` runs before each commit (the job's lease check: a worker that lost its
    lease must not write). The grade job for the new groups is enqueued in the last transaction.
    """
    settings = get_settings()
    with session_scope() as session:
        snapshot = session.get(Snapshot, snapshot_id)
        if snapshot is None:
            raise PermanentJobError(f"snapshot {snapshot_id} does not exist")
        policy = snapshot.policy
        opts = PipelineOptions.for_policy(policy)
        adapter = adapter_for(snapshot)
        group_size = policy.group_size
        base_model = policy.base_model
        have = set(
            session.scalars(
                select(RolloutGroup.trace_id).where(
                    RolloutGroup.snapshot_id == snapshot_id, RolloutGroup.trace_id.in_(trace_ids)
                )
            )
        )
        rows = session.execute(
            select(Trace.id, Trace.messages, Trace.request)
            .where(Trace.id.in_(trace_ids))
            .order_by(Trace.id)
        ).all()
        # The request's tool definitions are part of the prompt (rendered by encode_prompt).
        todo = [(int(r.id), with_tools(r.messages, (r.request or {}).get("tools")))
                for r in rows if r.id not in have]
    out = RegenerateResult(traces_skipped=len(trace_ids) - len(todo))
    if not todo:
        return out
    backend = backend or backend_for(settings, base_model)
    for start in range(0, len(todo), opts.traces_per_call):
        chunk = todo[start : start + opts.traces_per_call]
        params = sampling_params(policy, seed=_seed(snapshot_id, [t for t, _ in chunk]))
        outputs = backend.generate([m for _, m in chunk], group_size, params, adapter)
        if before_write is not None:
            before_write()
        with session_scope() as session:
            for (trace_id, _), completions in zip(chunk, outputs, strict=True):
                group_id = session.scalar(
                    upsert_insert(session, RolloutGroup.__table__)
                    .values(
                        trace_id=trace_id,
                        snapshot_id=snapshot_id,
                        group_size=group_size,
                        status=GroupStatus.generated,
                        # What was sampled with: the trainer scores π_ref at this temperature.
                        sampling_params={"max_tokens": params.max_tokens,
                                         "temperature": params.temperature, "seed": params.seed},
                        created_at=utcnow(),
                        updated_at=utcnow(),
                    )
                    .on_conflict_do_nothing(index_elements=["trace_id", "snapshot_id"])
                    .returning(RolloutGroup.id)
                )
                if group_id is None:  # another worker got there first: its rows stand
                    out.traces_skipped += 1
                    continue
                session.execute(
                    insert(Rollout),
                    [
                        {
                            "group_id": group_id,
                            "index": i,
                            "text": storable_text(c.text),
                            "token_ids": list(c.token_ids),
                            "token_logprobs": [float(x) for x in c.logprobs],
                            "behaviour_logprob_sum": c.logprob_sum,
                            "finish_reason": c.finish_reason,
                            "status": RolloutStatus.generated,
                            "created_at": utcnow(),
                        }
                        for i, c in enumerate(completions)
                    ],
                )
                out.groups_created.append(int(group_id))
                out.completions += len(completions)
                out.completion_tokens += sum(len(c.token_ids) for c in completions)
            last = start + opts.traces_per_call >= len(todo)
            if last and enqueue_grading and out.groups_created:
                job = enqueue(
                    session,
                    JobKind.grade,
                    grade_job_key(snapshot_id, out.groups_created),
                    {"group_ids": out.groups_created},
                )
                out.grade_job_id = job.id
    return out


# --- grading -----------------------------------------------------------------------------------


class GraderTimeout(TimeoutError):
    pass


def grade_with_timeout(
    grader: Grader,
    messages: list[dict[str, str]],
    text: str,
    outcome: Mapping[str, Any] | None,
    timeout_s: float,
) -> GradeResult:
    """Run one grade call in a daemon thread; a hung grader costs one thread, not the batch."""
    box: dict[str, Any] = {}

    def _call() -> None:
        try:
            box["result"] = grader.grade(messages, text, outcome)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=_call, name="grader", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise GraderTimeout(f"grader timed out after {timeout_s:g}s")
    if "error" in box:
        raise box["error"]
    result = box["result"]
    if not isinstance(result, GradeResult) or not math.isfinite(float(result.reward)):
        raise ValueError(f"grader returned {result!r}, not a GradeResult with a finite reward")
    return result


@dataclass(frozen=True)
class GroupStats:
    mean: float
    std: float
    zero_variance: bool
    value_estimate: float


def group_stats(rewards: Sequence[float], beta1: float = 1.0, eps: float = 1e-9) -> GroupStats:
    """Mean, population std, zero-variance flag and OAPL's soft value V̂ (``losses.py``'s, the
    one definition the trainer uses too)."""
    if not rewards:
        raise ValueError("no rewards")
    g = len(rewards)
    mean = sum(rewards) / g
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / g)
    value = float(oapl_soft_value(torch.tensor(rewards, dtype=torch.float64), beta1))
    return GroupStats(mean, std, max(rewards) - min(rewards) <= eps, value)


@dataclass
class GradeSummary:
    groups_graded: int = 0
    groups_failed: int = 0
    rollouts_graded: int = 0
    rollouts_failed: int = 0
    skipped: int = 0


def grade_groups(
    group_ids: Sequence[int],
    *,
    grader: Grader | None = None,
    lost: Callable[[], bool] | None = None,
) -> GradeSummary:
    """Grade the ungraded rollouts of each group and store its statistics; one commit per group,
    so a crash redoes at most one group (graded rollouts are never re-graded)."""
    out = GradeSummary()
    for group_id in group_ids:
        if lost is not None and lost():
            break
        with session_scope() as session:
            group = session.get(
                RolloutGroup, group_id, options=[selectinload(RolloutGroup.rollouts)]
            )
            if group is None or group.status != GroupStatus.generated:
                out.skipped += 1
                continue
            trace = session.get(Trace, group.trace_id, options=[selectinload(Trace.outcomes)])
            snapshot = session.get(Snapshot, group.snapshot_id)
            assert trace is not None and snapshot is not None
            policy = snapshot.policy
            opts = PipelineOptions.for_policy(policy)
            g = grader or policy_grader(policy)
            outcome = {o.name: o.value for o in trace.outcomes}
            for r in group.rollouts:
                if r.status != RolloutStatus.generated:
                    continue
                r.grader_version = g.version
                try:
                    res = grade_with_timeout(
                        g, trace.messages, r.text, outcome, opts.grade_timeout_s
                    )
                except Exception as exc:
                    r.status = RolloutStatus.failed
                    r.grade_error = storable_text(f"{type(exc).__name__}: {exc}")[:2000]
                    out.rollouts_failed += 1
                    continue
                r.status, r.reward, r.parse_ok = RolloutStatus.graded, res.reward, res.parse_ok
                out.rollouts_graded += 1
            finish_group(group, g.version, opts.beta1)
            if group.status == GroupStatus.graded:
                out.groups_graded += 1
            else:
                out.groups_failed += 1
    return out


def finish_group(group: RolloutGroup, grader_version: str, beta1: float) -> None:
    """Statistics over the rollouts that could be graded; failed rollouts take no part (their
    reward is unknown, not zero). A group with none graded is failed with the first reason."""
    group.grader_version = grader_version
    graded = [r for r in group.rollouts if r.status == RolloutStatus.graded]
    if not graded:
        reasons = [r.grade_error for r in group.rollouts if r.grade_error]
        group.status = GroupStatus.failed
        group.error = "no rollout could be graded: " + (reasons[0] if reasons else "no rollouts")
        return
    stats = group_stats([float(r.reward) for r in graded if r.reward is not None], beta1)
    group.reward_mean, group.reward_std = stats.mean, stats.std
    group.zero_variance, group.value_estimate = stats.zero_variance, stats.value_estimate
    failed = len(group.rollouts) - len(graded)
    group.error = f"{failed} of {len(group.rollouts)} rollouts failed grading" if failed else None
    group.status = GroupStatus.graded


# --- job handlers (called by the thin Celery tasks) --------------------------------------------


def handle_rollout_job(ctx: JobContext) -> dict[str, Any]:
    result = regenerate(
        [int(t) for t in ctx.payload["trace_ids"]],
        int(ctx.payload["snapshot_id"]),
        before_write=ctx.check,
    )
    return {
        "groups_created": len(result.groups_created),
        "traces_skipped": result.traces_skipped,
        "completion_tokens": result.completion_tokens,
        "grade_job_id": result.grade_job_id,
    }


def handle_grade_job(ctx: JobContext) -> dict[str, Any]:
    summary = grade_groups([int(g) for g in ctx.payload["group_ids"]], lost=lambda: ctx.lost)
    ctx.check()
    return {
        "groups_graded": summary.groups_graded,
        "groups_failed": summary.groups_failed,
        "rollouts_graded": summary.rollouts_graded,
        "rollouts_failed": summary.rollouts_failed,
        "skipped": summary.skipped,
    }
