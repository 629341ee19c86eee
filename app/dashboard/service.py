"""What the dashboard pages show, assembled from rows; the routes only render it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from croniter import croniter
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.dashboard import charts, words
from app.dashboard.words import Setting
from app.db import utcnow
from app.errors import NotFound
from app.jobs.service import replan_due_at
from app.models import (
    Evaluation,
    GroupStatus,
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
from app.snapshots.gate import decide
from app.snapshots.promotion import previous_serving
from app.snapshots.schemas import AuditEventOut
from app.snapshots.service import list_audit_events

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
class PolicyPage:
    row: PolicyRow
    snapshots: list[Snapshot]
    names: dict[int, str]
    """Snapshot id → served name, for parents."""
    settings: list[Setting]
    config_json: str
    curve_svgs: list[str]
    events: list[AuditEventOut]


CHART_RUNS = 5


def policy_page(session: Session, tenant: str, name: str) -> PolicyPage:
    row, snaps = policy_row(session, tenant, name)
    p = row.policy
    runs = list(session.scalars(
        select(TrainingRun).where(TrainingRun.policy_id == p.id)
        .order_by(TrainingRun.id.desc()).limit(CHART_RUNS)
    ))
    last_config = next((r.config for r in runs if r.config), None)
    settings = words.policy_settings(
        p.sampling_params or {}, p.group_size, p.grader_spec or {}, p.training_config or {},
        last_config, p.gate or {}, p.schedule,
    )
    config = {"sampling": p.sampling_params, "group_size": p.group_size,
              "grader": p.grader_spec, "training": p.training_config, "gate": p.gate,
              "schedule": p.schedule}
    names = {s.id: s.served_name for s in snaps}
    events = list_audit_events(session, tenant, limit=15).items
    mine = {("snapshot", str(s.id)) for s in snaps} | {("policy", str(p.id))}
    return PolicyPage(
        row=row, snapshots=snaps, names=names, settings=settings,
        config_json=words.pretty_json(config),
        curve_svgs=training_charts([(_run_label(r, names), r) for r in reversed(runs)]),
        events=[e for e in events if (e.entity_type, e.entity_id) in mine],
    )


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
    gate_rows: list[dict[str, Any]] = field(default_factory=list)
    gate_note: str | None = None
    """Set when the rows were recomputed (an evaluation stored before gate rows were)."""
    examples: list[dict[str, Any]] = field(default_factory=list)
    run_settings: list[Setting] = field(default_factory=list)
    config_json: str = ""
    lineage_words: list[str] = field(default_factory=list)
    data_words: str | None = None
    events: list[AuditEventOut] = field(default_factory=list)


def _metric_rows(ev: Evaluation) -> list[dict[str, Any]]:
    champ = ev.comparison.get("champion", {})
    paired = ev.comparison.get("paired", {})
    names = [m for m in METRIC_ORDER if m in ev.metrics]
    names += sorted(m for m in ev.metrics if m.startswith("pass@"))
    rows = []
    for m in names:
        rows.append({
            "name": m,
            "help": words.metric_help(m),
            "candidate": ev.metrics.get(m, {}),
            "champion": champ.get(m, {}),
            "paired": paired.get(m),
        })
    return rows


def _gate_rows(ev: Evaluation, policy: Policy) -> tuple[list[dict[str, Any]], str | None]:
    """The gate as decided for this evaluation; for one stored before the rows were, the
    policy's current gate applied to its numbers (and a note saying so)."""
    stored = ev.comparison.get("gate_rows")
    if stored:
        return list(stored), None
    try:
        decision = decide(policy.gate or {}, ev.metrics, ev.comparison.get("champion", {}),
                          ev.n, ev.comparison.get("paired"))
    except KeyError:
        return [], None
    return decision.rows, "recomputed with the policy's current gate"


# (history key, chart title, sign): the KL chart shows −mean log(πθ/π_ref) over π_ref's samples,
# an estimate of KL(π_ref ‖ πθ).
CURVES = (("loss", "loss", 1.0),
          ("train_reward", "mean reward of the step's rollouts", 1.0),
          ("mean_log_ratio", "KL(π_ref ‖ πθ) estimate", -1.0))


def _run_label(run: TrainingRun, names: dict[int, str]) -> str:
    target = names.get(run.output_snapshot_id or -1)
    return f"run {run.id} → {target}" if target else f"run {run.id} ({run.status.value})"


def training_charts(runs: Sequence[tuple[str, TrainingRun]]) -> list[str]:
    """Loss, reward and KL over optimizer steps: one line per run."""
    out = []
    for key, title, sign in CURVES:
        series = {}
        for label, run in runs:
            history = (run.metrics or {}).get("history") or []
            pts = [(float(h["step"]), sign * float(h[key])) for h in history
                   if isinstance(h.get(key), int | float) and "step" in h]
            if pts:
                series[label] = pts
        out.append(charts.line_chart(series, title=title, width=360, height=200,
                                     x_label="optimizer step"))
    return out


def _examples(session: Session, policy: Policy, ev: Evaluation) -> list[dict[str, Any]]:
    """Disagreements with a title a reviewer recognises and the outcome in words."""
    ids = [e.get("prompt_id") for e in ev.examples or []]
    meta: dict[str, Any] = dict(session.execute(
        select(Trace.external_id, Trace.meta)
        .where(Trace.policy_id == policy.id, Trace.external_id.in_(ids))
    ).tuples().all()) if ids else {}
    return [e | {"title": words.example_title(str(e.get("prompt", "")),
                                              meta.get(e.get("prompt_id"))),
                 "outcome_text": words.outcome_text(e.get("outcome"))}
            for e in ev.examples or []]


def _lineage_words(
    snapshot: Snapshot, parent: Snapshot | None, run: TrainingRun | None,
    events: Sequence[AuditEventOut], names: dict[int, str],
) -> list[str]:
    """The snapshot's story in sentences: where it came from, then what happened to it."""
    name = snapshot.served_name
    out = []
    if run is not None:
        summary = (run.metrics or {}).get("summary") or {}
        source = f"{parent.served_name}'s" if parent else "the base model's"
        steps = summary.get("optimizer_steps")
        how = f"{run.algorithm.upper()}, training run {run.id}"
        if steps is not None:
            how += (f": {words.count(int(steps), 'optimizer step')} over "
                    f"{words.value_text(summary.get('epochs'))} epochs")
        out.append(f"{name} was trained from {source} rollouts of "
                   f"{words.count(len(run.trace_ids or []), 'trace')} ({how}).")
    elif snapshot.adapter_path is None:
        out.append(f"{name} is the base model of {snapshot.policy.name}, with no adapter.")
    elif parent is not None:
        out.append(f"{name} was derived from {parent.served_name}.")
    approver: AuditEventOut | None = None
    for e in sorted(events, key=lambda e: e.id):
        when = e.created_at.strftime("%Y-%m-%d %H:%M UTC")
        if e.action == "snapshot.approved":
            approver = e
        elif e.action == "snapshot.awaiting_approval":
            out.append(f"It passed the gate on {when} and waited for approval.")
        elif e.action == "snapshot.serving":
            replaced = names.get(int(e.after.get("replaced_snapshot_id") or -1))
            what = f"it replaced {replaced}" if replaced else "it started serving"
            if approver is not None:
                by = f"after approval by {approver.actor}"
                if approver.reason and approver.reason != "approved":
                    by += f" (“{approver.reason}”)"
            else:  # the only other way to serve again: a rollback
                by = f"when {e.actor} rolled back to it ({e.reason or 'no reason given'})"
            out.append(f"On {when} {what} {by}.")
            approver = None
        elif e.action == "snapshot.retired":
            out.append(f"On {when} it was {e.reason or 'retired'}.")
        elif e.action == "snapshot.rolled_back":
            # The transition's reason names what serves instead ("rolled back to X").
            out.append(f"On {when} {e.actor} {e.reason or 'rolled it back'}; it will not serve "
                       "again without a fresh evaluation and approval.")
        elif e.action in ("snapshot.rejected", "snapshot.superseded", "snapshot.failed"):
            verdict = e.action.removeprefix("snapshot.")
            out.append(f"On {when} it was {verdict} by {e.actor}: {e.reason or 'no reason'}.")
    return out


def _data_words(session: Session, policy: Policy, run: TrainingRun,
                group_ids: Sequence[int], parent: Snapshot | None) -> str:
    """"N traces used of M graded groups", explained."""
    used = len(group_ids)
    source = parent.served_name if parent else "the serving snapshot"
    group_size = (run.config or {}).get("group_size", policy.group_size)
    text = (f"Trained on {words.count(used, 'rollout group')}: one per train trace, each "
            f"holding the {group_size} completions {source} generated for that trace, scored by "
            f"the grader.")
    if run.parent_snapshot_id is None:
        return text
    graded = select(RolloutGroup).join(Trace, Trace.id == RolloutGroup.trace_id).where(
        Trace.policy_id == policy.id, RolloutGroup.snapshot_id == run.parent_snapshot_id,
        RolloutGroup.status == GroupStatus.graded,
    ).subquery()
    total = session.scalar(select(func.count()).select_from(graded)) or 0
    if total <= used:
        return text
    unused = graded.c.id.not_in(select(training_run_groups.c.group_id)
                                .where(training_run_groups.c.training_run_id == run.id))
    flat = session.scalar(select(func.count()).select_from(graded).where(
        unused, graded.c.zero_variance.is_(True)
    )) or 0
    elsewhere = session.scalar(select(func.count()).select_from(graded).where(
        unused, graded.c.zero_variance.is_not(True),
        graded.c.id.in_(select(training_run_groups.c.group_id)
                        .where(training_run_groups.c.training_run_id != run.id)),
    )) or 0
    rest = max(0, total - used - flat - elsewhere)
    parts = []
    if flat:
        parts.append(f"{flat} had no reward variance (all {group_size} completions scored the "
                     "same, so there is nothing to prefer and they teach nothing)")
    if elsewhere:
        parts.append(f"{elsewhere} had trained an earlier run")
    if rest:
        parts.append(f"{rest} were graded after this run started or beyond its group cap")
    return text + f" {source} has {total} graded groups in all; " + "; ".join(parts) + "."


def snapshot_page(session: Session, tenant: str, snapshot_id: int) -> SnapshotPage:
    snapshot = session.get(Snapshot, snapshot_id)
    if snapshot is None or snapshot.policy.tenant != tenant:
        raise NotFound(f"no snapshot with id {snapshot_id}")
    policy = snapshot.policy
    ev = session.scalar(
        select(Evaluation).where(Evaluation.snapshot_id == snapshot.id)
        .order_by(Evaluation.id.desc()).limit(1)
    )
    names = dict(session.execute(
        select(Snapshot.id, Snapshot.served_name).where(Snapshot.policy_id == policy.id)
    ).tuples().all())
    events = list_audit_events(session, tenant, entity_type="snapshot",
                               entity_id=str(snapshot_id), limit=100).items
    champion_name = None
    interval_svg = reward_svg = breakdown_svg = ""
    rows: list[dict[str, Any]] = []
    gate_rows: list[dict[str, Any]] = []
    gate_note = None
    examples: list[dict[str, Any]] = []
    if ev is not None:
        champ = session.get(Snapshot, ev.champion_snapshot_id or -1)
        champion_name = champ.served_name if champ else ev.comparison.get("champion_served_name")
        rows = _metric_rows(ev)
        gate_rows, gate_note = _gate_rows(ev, policy)
        examples = _examples(session, policy, ev)
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
    config: dict[str, Any] | None = None
    data_words = None
    if run is not None:
        group_ids = list(session.scalars(
            select(training_run_groups.c.group_id)
            .where(training_run_groups.c.training_run_id == run.id)
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
            "group_ids_digest": run.group_ids_digest,
            "grader_versions": graders,
        }
        config = run.config
        data_words = _data_words(session, policy, run, group_ids, parent)
    elif snapshot.manifest:
        config = snapshot.manifest.get("config")
        lineage |= {"group_count": snapshot.manifest.get("n_groups")}
    return SnapshotPage(
        snapshot=snapshot, policy=policy, evaluation=ev, champion_name=champion_name,
        metric_rows=rows, interval_svg=interval_svg, reward_svg=reward_svg,
        curve_svgs=training_charts(_lineage_runs(session, snapshot, run, names)),
        breakdown_svg=breakdown_svg, run=run, parent=parent, lineage=lineage,
        gate_rows=gate_rows, gate_note=gate_note, examples=examples,
        run_settings=words.run_settings(config) if config else [],
        config_json=words.pretty_json(config) if config else "",
        lineage_words=_lineage_words(snapshot, parent, run, events, names),
        data_words=data_words, events=events,
    )


LINEAGE_RUNS = 4


def _lineage_runs(session: Session, snapshot: Snapshot, run: TrainingRun | None,
                  names: dict[int, str]) -> list[tuple[str, TrainingRun]]:
    """This snapshot's run and the runs that trained its ancestors, oldest first."""
    runs: list[tuple[str, TrainingRun]] = []
    node: Snapshot | None = snapshot
    current = run
    while node is not None and len(runs) < LINEAGE_RUNS:
        if current is not None:
            runs.append((_run_label(current, names), current))
        node = session.get(Snapshot, node.parent_id) if node.parent_id else None
        current = (session.get(TrainingRun, node.training_run_id)
                   if node is not None and node.training_run_id else None)
    return list(reversed(runs))


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
