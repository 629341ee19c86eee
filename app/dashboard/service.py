"""What the dashboard pages show, assembled from rows; the routes only render it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from croniter import croniter
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.dashboard import charts
from app.db import utcnow
from app.errors import NotFound
from app.jobs.service import replan_due_at
from app.models import (
    Evaluation,
    Job,
    JobStatus,
    Policy,
    Rollout,
    RolloutGroup,
    RunStatus,
    Snapshot,
    SnapshotStatus,
    Trace,
    TrainingRun,
    training_run_groups,
)
from app.snapshots.promotion import previous_serving

PENDING = (SnapshotStatus.candidate, SnapshotStatus.evaluated, SnapshotStatus.awaiting_approval,
           SnapshotStatus.approved, SnapshotStatus.deploying)
METRIC_ORDER = ("correct", "parse_rate", "mean_reward")


@dataclass
class PolicyRow:
    policy: Policy
    serving: Snapshot | None
    candidates: list[Snapshot]
    traces: int
    groups: int
    rollouts: int
    next_run: datetime | None
    running: list[str]
    failures: list[str]
    rollback_target: Snapshot | None
    """What a rollback would serve; None when nothing was ever replaced."""


def next_run(schedule: str | None, now: datetime | None = None) -> datetime | None:
    if not schedule:
        return None
    try:
        nxt: datetime = croniter(schedule, now or datetime.now(UTC)).get_next(datetime)
    except (ValueError, KeyError):
        return None
    return nxt


def _retry_note(job: Job) -> str:
    """Whether and when the scheduler plans a failed job again."""
    due = replan_due_at(job)
    if due is None:
        return f"final after {job.replans} re-plans"
    return f"re-plan {job.replans + 1} due {due.strftime('%H:%M:%S')} UTC"


def _jobs_for(session: Session, policy: Policy, statuses: tuple[JobStatus, ...]) -> list[Job]:
    # The job table is shared by every policy; a job names its policy, or a snapshot or training
    # run of it, in the payload.
    recent = list(session.scalars(
        select(Job).where(Job.status.in_(statuses)).order_by(Job.id.desc()).limit(200)
    ))
    if not recent:
        return []
    snapshot_ids = set(session.scalars(select(Snapshot.id).where(Snapshot.policy_id == policy.id)))
    run_ids = set(session.scalars(
        select(TrainingRun.id).where(TrainingRun.policy_id == policy.id)
    ))

    def mine(payload: dict[str, Any]) -> bool:
        return (payload.get("policy_id") == policy.id or payload.get("policy") == policy.name
                or payload.get("snapshot_id") in snapshot_ids
                or payload.get("run_id") in run_ids)

    return [j for j in recent if mine(j.payload or {})]


def policy_rows(session: Session, tenant: str) -> list[PolicyRow]:
    policies = list(session.scalars(
        select(Policy).where(Policy.tenant == tenant).order_by(Policy.name)
    ))
    rows = []
    for p in policies:
        traces = session.scalar(select(func.count()).where(Trace.policy_id == p.id)) or 0
        groups = session.scalar(
            select(func.count(RolloutGroup.id))
            .join(Trace, Trace.id == RolloutGroup.trace_id)
            .where(Trace.policy_id == p.id)
        ) or 0
        rollouts = session.scalar(
            select(func.count(Rollout.id))
            .join(RolloutGroup, RolloutGroup.id == Rollout.group_id)
            .join(Trace, Trace.id == RolloutGroup.trace_id)
            .where(Trace.policy_id == p.id)
        ) or 0
        snaps = list(session.scalars(
            select(Snapshot).where(Snapshot.policy_id == p.id).order_by(Snapshot.version.desc())
        ))
        runs = list(session.scalars(
            select(TrainingRun).where(TrainingRun.policy_id == p.id)
            .order_by(TrainingRun.id.desc()).limit(20)
        ))
        running = [f"training run {r.id} ({r.algorithm}, {r.progress:.0%})" for r in runs
                   if r.status in (RunStatus.queued, RunStatus.running)]
        running += [f"{j.kind.value} job {j.id}"
                    for j in _jobs_for(session, p, (JobStatus.running, JobStatus.retrying))]
        failures = [f"training run {r.id}: {(r.error or 'failed')[:160]}" for r in runs
                    if r.status is RunStatus.failed][:3]
        failures += [f"{s.served_name}: {(s.status_reason or 'failed')[:160]}" for s in snaps
                     if s.status is SnapshotStatus.failed][:3]
        failures += [f"{j.kind.value} job {j.id}: {(j.error or 'failed')[:160]}"
                     f" ({_retry_note(j)})"
                     for j in _jobs_for(session, p, (JobStatus.failed,))][:3]
        rows.append(PolicyRow(
            policy=p,
            serving=next((s for s in snaps if s.id == p.serving_snapshot_id), None),
            candidates=[s for s in snaps if s.status in PENDING],
            traces=traces, groups=groups, rollouts=rollouts,
            next_run=next_run(p.schedule), running=running, failures=failures,
            rollback_target=previous_serving(session, p),
        ))
    return rows


def policy_by_name(session: Session, tenant: str, name: str) -> Policy:
    policy = session.scalar(select(Policy).where(Policy.tenant == tenant, Policy.name == name))
    if policy is None:
        raise NotFound(f"no policy named {name!r}")
    return policy


def policy_row(session: Session, tenant: str, name: str) -> tuple[PolicyRow, list[Snapshot]]:
    policy_by_name(session, tenant, name)
    row = next(r for r in policy_rows(session, tenant) if r.policy.name == name)
    snaps = list(session.scalars(
        select(Snapshot).where(Snapshot.policy_id == row.policy.id)
        .order_by(Snapshot.version.desc())
    ))
    return row, snaps


@dataclass
class SnapshotPage:
    snapshot: Snapshot
    policy: Policy
    evaluation: Evaluation | None
    champion_name: str | None
    metric_rows: list[dict[str, Any]]
    interval_svg: str
    reward_svg: str
    curve_svgs: list[str]
    breakdown_svg: str
    run: TrainingRun | None
    parent: Snapshot | None
    lineage: dict[str, Any] = field(default_factory=dict)


def _metric_rows(ev: Evaluation) -> list[dict[str, Any]]:
    champ = ev.comparison.get("champion", {})
    paired = ev.comparison.get("paired", {})
    names = [m for m in METRIC_ORDER if m in ev.metrics]
    names += sorted(m for m in ev.metrics if m.startswith("pass@"))
    rows = []
    for m in names:
        rows.append({
            "name": m,
            "candidate": ev.metrics.get(m, {}),
            "champion": champ.get(m, {}),
            "paired": paired.get(m),
        })
    return rows


def _curves(run: TrainingRun | None) -> list[str]:
    history = (run.metrics or {}).get("history", []) if run is not None else []
    if not history:
        return [charts.line_chart({}, title="training curves")]
    out = []
    for title, keys in (("loss", ("loss",)),
                        ("reward", ("train_reward", "mean_reward", "reward")),
                        ("parse rate", ("heldout_parse_rate", "parse_rate"))):
        series = {}
        for key in keys:
            pts = [(float(h.get("step", i)), float(h[key])) for i, h in enumerate(history)
                   if isinstance(h.get(key), int | float)]
            if pts:
                series[key] = pts
        out.append(charts.line_chart(series, title=title, width=300, height=180))
    return out


def snapshot_page(session: Session, tenant: str, snapshot_id: int) -> SnapshotPage:
    snapshot = session.get(Snapshot, snapshot_id)
    if snapshot is None or snapshot.policy.tenant != tenant:
        raise NotFound(f"no snapshot with id {snapshot_id}")
    policy = snapshot.policy
    ev = session.scalar(
        select(Evaluation).where(Evaluation.snapshot_id == snapshot.id)
        .order_by(Evaluation.id.desc()).limit(1)
    )
    champion_name = None
    interval_svg = reward_svg = breakdown_svg = ""
    rows: list[dict[str, Any]] = []
    if ev is not None:
        champ = session.get(Snapshot, ev.champion_snapshot_id or -1)
        champion_name = champ.served_name if champ else ev.comparison.get("champion_served_name")
        rows = _metric_rows(ev)
        cand_label = snapshot.served_name
        champ_label = champion_name or "champion"
        interval_svg = charts.interval_chart(
            [r["name"] for r in rows],
            {cand_label: ev.metrics, champ_label: ev.comparison.get("champion", {})},
            title="held-out metrics (95% CI)", width=560,
        )
        hist = ev.comparison.get("reward_hist", {})
        cats = sorted({float(v) for h in hist.values() for v, _ in h})
        reward_svg = charts.bar_chart(
            [charts._fmt(c) for c in cats],
            {
                cand_label: [dict((float(v), c) for v, c in hist.get("candidate", [])).get(x, 0)
                             for x in cats],
                champ_label: [dict((float(v), c) for v, c in hist.get("champion", [])).get(x, 0)
                              for x in cats],
            },
            title="reward distribution (samples)",
        )
        groups = (ev.breakdown or {}).get("groups", {})
        if groups:
            keys = sorted(groups)
            breakdown_svg = charts.bar_chart(
                keys,
                {cand_label: [groups[k]["candidate"]["correct"] for k in keys],
                 champ_label: [groups[k]["champion"]["correct"] for k in keys]},
                title=f"correct by {ev.breakdown.get('key')}", width=560,
            )
    run = session.get(TrainingRun, snapshot.training_run_id) if snapshot.training_run_id else None
    parent = session.get(Snapshot, snapshot.parent_id) if snapshot.parent_id else None
    lineage: dict[str, Any] = {
        "adapter_sha256": snapshot.adapter_sha256,
        "adapter_path": snapshot.adapter_path,
        "parent": (snapshot.manifest or {}).get("parent"),
    }
    if run is not None:
        group_ids = list(session.scalars(
            select(training_run_groups.c.group_id)
            .where(training_run_groups.c.training_run_id == run.id).limit(2000)
        ))
        graders = sorted({g for g in session.scalars(
            select(RolloutGroup.grader_version).where(RolloutGroup.id.in_(group_ids))
        ) if g}) if group_ids else []
        lineage |= {
            "training_run": run.id,
            "algorithm": run.algorithm,
            "trace_count": len(run.trace_ids or []),
            "trace_ids": (run.trace_ids or [])[:30],
            "group_count": len(group_ids),
            "group_ids": group_ids[:30],
            "group_ids_digest": run.group_ids_digest,
            "grader_versions": graders,
            "config": run.config,
        }
    elif snapshot.manifest:
        lineage |= {"config": snapshot.manifest.get("config"),
                    "group_count": snapshot.manifest.get("n_groups")}
    return SnapshotPage(
        snapshot=snapshot, policy=policy, evaluation=ev, champion_name=champion_name,
        metric_rows=rows, interval_svg=interval_svg, reward_svg=reward_svg,
        curve_svgs=_curves(run), breakdown_svg=breakdown_svg, run=run, parent=parent,
        lineage=lineage,
    )


def age(ts: datetime | None) -> str:
    """A compact "3m ago" for tables."""
    if ts is None:
        return "—"
    if ts.tzinfo is None:
        # SQLite hands back naive datetimes; everything is stored in UTC.
        ts = ts.replace(tzinfo=UTC)
    seconds = max(0, int((utcnow() - ts).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"
