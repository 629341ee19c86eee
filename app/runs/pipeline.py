"""Regenerate → grade → train, all in this process: what ``tracelearn regenerate --wait``, the
demo and the tests run when no broker is wanted. The candidate is returned, not evaluated."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from app.db import session_scope
from app.errors import Conflict
from app.jobs.service import run_job
from app.models import Policy, RunStatus, Snapshot, TrainingRun
from app.rollouts.service import (
    PipelineOptions,
    grade_groups,
    pending_trace_ids,
    regenerate,
    serving_snapshot,
)
from app.runs.training import count_trainable_groups, execute_run, start_run, train_job

StageProgress = Callable[[str, int, int], None]
"""progress(stage, done, total): stage is "regenerate", "grade" or "train"."""


@dataclass
class PipelineResult:
    policy: str
    traces: int = 0
    groups_created: int = 0
    groups_graded: int = 0
    groups_failed: int = 0
    trainable_groups: int = 0
    run_id: int | None = None
    run_status: str | None = None
    snapshot_id: int | None = None
    served_name: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def run_policy_pipeline(
    policy_name: str,
    *,
    progress: StageProgress | None = None,
    train: bool = True,
    overrides: dict[str, Any] | None = None,
    max_traces: int | None = None,
) -> PipelineResult:
    """Regenerate every pending trace of the policy from its serving snapshot, grade the groups,
    then train one run (OAPL by default: the policy's config, ``overrides`` on top) — all in this
    process, no broker needed. The candidate snapshot is returned, not evaluated."""
    report = progress or (lambda stage, done, total: None)
    out = PipelineResult(policy=policy_name)
    with session_scope() as session:
        policy = session.scalars(select(Policy).where(Policy.name == policy_name)).first()
        if policy is None:
            raise LookupError(f"no policy named {policy_name!r}")
        snapshot_id = serving_snapshot(session, policy).id
        trace_ids = pending_trace_ids(session, policy, snapshot_id, max_traces)
        step = PipelineOptions.for_policy(policy).traces_per_call
    out.traces = len(trace_ids)
    group_ids: list[int] = []
    report("regenerate", 0, len(trace_ids))
    for start in range(0, len(trace_ids), step):
        res = regenerate(trace_ids[start : start + step], snapshot_id, enqueue_grading=False)
        group_ids += res.groups_created
        report("regenerate", min(start + step, len(trace_ids)), len(trace_ids))
    out.groups_created = len(group_ids)
    report("grade", 0, len(group_ids))
    for i, gid in enumerate(group_ids, 1):
        summary = grade_groups([gid])
        out.groups_graded += summary.groups_graded
        out.groups_failed += summary.groups_failed
        report("grade", i, len(group_ids))
    if not train:
        return out
    with session_scope() as session:
        policy = session.scalars(select(Policy).where(Policy.name == policy_name)).one()
        out.trainable_groups = count_trainable_groups(session, policy)
        try:
            run = start_run(session, policy, trigger="demo", actor="system:demo",
                            overrides=overrides, dispatch=False)
        except Conflict as exc:
            out.error = exc.detail
            return out
        session.flush()
        run_id = run.id
        job = train_job(session, run_id)
        assert job is not None
        job_id = job.id
    out.run_id = run_id
    report("train", 0, 1)

    def handler(ctx: Any) -> dict[str, Any]:
        run = execute_run(int(ctx.payload["run_id"]), check=ctx.check,
                          progress=lambda s, t, m: report("train", s, t), enqueue_eval=False)
        return {"run_id": run.id, "status": run.status.value}

    run_job(job_id, handler)  # records failures on the job and the run itself
    with session_scope() as session:
        row = session.get(TrainingRun, run_id)
        assert row is not None
        out.run_status = row.status.value
        out.error = row.error
        out.metrics = dict(row.metrics or {})
        if row.status == RunStatus.succeeded and row.output_snapshot_id is not None:
            snap = session.get(Snapshot, row.output_snapshot_id)
            assert snap is not None
            out.snapshot_id, out.served_name = snap.id, snap.served_name
    report("train", 1, 1)
    return out
