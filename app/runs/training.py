"""Training runs: graded groups from the serving snapshot → OAPL (or GRPO) → a candidate snapshot.

    start_run      validate the config, check there is data, create the TrainingRun + train job
    execute_run    build the learner's TrainingGroup dataclasses from rows, train starting from the
                   serving adapter (in this process, or under ``torchrun`` when the policy asks for
                   ``processes`` > 1), write the adapter atomically, then in ONE transaction: the
                   candidate Snapshot (version N+1, ``{policy}-v{N+1}``, parent, sha256), lineage
                   rows in ``training_run_groups``, the run's metrics, and the eval job
    trainable_groups   graded, non-zero-variance train groups of the serving snapshot that no
                   succeeded run has used yet ("since the last run": the data trigger counts them)
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import exists, func, insert, select
from sqlalchemy.orm import Session, selectinload

from app.audit import record
from app.db import session_scope, utcnow
from app.errors import Conflict, InvalidInput
from app.jobs.service import HandedBack, JobContext, PermanentJobError, enqueue
from app.models import (
    GroupStatus,
    Job,
    JobKind,
    JobStatus,
    Policy,
    RolloutGroup,
    RolloutStatus,
    RunStatus,
    Snapshot,
    SnapshotStatus,
    Split,
    Trace,
    TrainingRun,
    training_run_groups,
)
from app.observability import ops
from app.policies.schemas import DEFAULT_MAX_GROUPS
from app.policies.service import sampling_params, served_name
from app.settings import get_settings
from app.snapshots.evaluation import eval_job_key
from app.snapshots.state import supersede_stale_candidates
from workers.inference.chat import with_tools
from workers.learner import adapters
from workers.learner.allocator import (
    AllocatorUnavailable,
    learner_environment,
    release_free_memory,
    release_gpu_cache,
)

log = logging.getLogger(__name__)

PIPELINE_KEYS = frozenset(
    {"min_groups", "traces_per_job", "traces_per_call", "grade_timeout_s", "max_groups",
     "processes"}
)
"""Keys of ``policy.training_config`` that steer the pipeline, not the trainer."""
ACTIVE_RUN = (RunStatus.queued, RunStatus.running)
ProgressFn = Callable[[int, int, dict[str, float]], None]
LEARNER_POLL_S = 0.5
"""How long the train job waits for the learner processes' output between looks at them."""
LEARNER_CHECK_S = 1.0
"""How often the train job checks its lease and the stop flag while the learner processes run."""


class LearnerFailed(RuntimeError):
    """The learner processes exited without a result; the message ends with their last lines."""


def train_job_key(run_id: int) -> str:
    """The one train job of a run."""
    return f"train:run={run_id}"


def train_job(session: Session, run_id: int) -> Job | None:
    return session.scalars(select(Job).where(Job.key == train_job_key(run_id))).first()


def trainer_config(policy: Policy, overrides: dict[str, Any] | None = None) -> Any:
    """The learner's ``TrainerConfig`` from the policy's training config plus ``overrides``;
    sampling-related fields follow the policy. Raises ``InvalidInput`` on unknown or bad keys."""
    # The learner is imported here, not at the top: it loads torch, and the API process, which
    # validates configs and starts runs, never trains.
    from workers.learner.trainer import TrainerConfig, TrainerConfigError

    if "processes" in (overrides or {}):
        raise InvalidInput("processes is a policy setting (training.processes), not a run's")
    merged = dict(policy.training_config or {}) | dict(overrides or {})
    learner_processes(merged)
    known = {f.name for f in dataclasses.fields(TrainerConfig)}
    unknown = set(merged) - known - PIPELINE_KEYS
    if unknown:
        raise InvalidInput(f"unknown training config keys: {sorted(unknown)}")
    values = {k: v for k, v in merged.items() if k in known}
    sampling = sampling_params(policy)
    values.setdefault("group_size", policy.group_size)
    values.setdefault("max_new_tokens", sampling.max_tokens)
    values.setdefault("temperature", sampling.temperature)
    try:
        return TrainerConfig.from_dict(values)
    except (TrainerConfigError, TypeError, ValueError) as exc:
        raise InvalidInput(str(exc)) from exc


def learner_processes(training_config: dict[str, Any]) -> int:
    """``processes`` of a training config (default 1): how many data-parallel learner processes a
    run uses. Raises ``InvalidInput`` unless it is an integer >= 1; the upper bound is the machine
    that trains (checked by the train job, not by the API process that may run elsewhere)."""
    value = training_config.get("processes", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"processes must be an integer >= 1, got {value!r}")
    return value


def _used_by_succeeded_run() -> Any:
    return exists().where(
        training_run_groups.c.group_id == RolloutGroup.id,
        training_run_groups.c.training_run_id == TrainingRun.id,
        TrainingRun.status == RunStatus.succeeded,
    )


def trainable_groups_query(
    policy: Policy, snapshot_id: int, *, keep_zero_variance: bool = False
) -> Any:
    """Graded train groups of ``snapshot_id`` that no succeeded run has used. Groups whose rewards
    are all equal are left out unless ``keep_zero_variance`` (the trainer config's
    ``keep_zero_variance_groups``: for OAPL such a group has Â = 0 and still anchors
    log πθ/π_ref toward 0)."""
    informative = () if keep_zero_variance else (RolloutGroup.zero_variance.is_(False),)
    return (
        select(RolloutGroup)
        .join(Trace, Trace.id == RolloutGroup.trace_id)
        .where(
            Trace.policy_id == policy.id,
            Trace.split == Split.train,
            RolloutGroup.snapshot_id == snapshot_id,
            RolloutGroup.status == GroupStatus.graded,
            *informative,
            ~_used_by_succeeded_run(),
        )
        .order_by(RolloutGroup.id)
    )


def count_trainable_groups(session: Session, policy: Policy) -> int:
    """The data trigger: informative (non-zero-variance) groups since the last run."""
    if policy.serving_snapshot_id is None:
        return 0
    q = trainable_groups_query(policy, policy.serving_snapshot_id).subquery()
    return int(session.scalar(select(func.count()).select_from(q)) or 0)


def active_run(session: Session, policy_id: int) -> TrainingRun | None:
    return session.scalars(
        select(TrainingRun).where(
            TrainingRun.policy_id == policy_id, TrainingRun.status.in_(ACTIVE_RUN)
        )
    ).first()


def start_run(
    session: Session,
    policy: Policy,
    *,
    trigger: str = "manual",
    actor: str = "system",
    overrides: dict[str, Any] | None = None,
    dispatch: bool = True,
) -> TrainingRun:
    """Create a queued run and its train job (sent after the caller commits; with
    ``dispatch=False`` the caller runs the job itself, see ``run_policy_pipeline``).

    Refuses (409) while another run of the policy is queued or running, or when there is nothing
    to train on; an invalid config is a 422 and nothing is written.
    """
    cfg = trainer_config(policy, overrides)
    if active_run(session, policy.id) is not None:
        raise Conflict(f"policy {policy.name!r} already has a training run in progress")
    available = count_trainable_groups(session, policy)
    if available == 0:
        raise Conflict(
            f"policy {policy.name!r} has no graded groups with reward variance from its serving "
            "snapshot that a previous run has not used; regenerate and grade traces first"
        )
    run = TrainingRun(
        policy_id=policy.id,
        algorithm=cfg.algorithm,
        status=RunStatus.queued,
        trigger=trigger,
        config=cfg.to_dict(),
        parent_snapshot_id=policy.serving_snapshot_id,
        metrics={"groups_available": available},
        progress=0.0,
        created_by=actor,
    )
    session.add(run)
    session.flush()
    enqueue(
        session, JobKind.train, train_job_key(run.id), {"run_id": run.id},
        max_attempts=2, dispatch=dispatch,
    )
    record(
        session, policy.tenant, actor, "training_run.start", "training_run", run.id,
        after={"policy": policy.name, "trigger": trigger, "algorithm": cfg.algorithm},
    )
    ops.info("run.started", run_id=run.id, policy=policy.name, trigger=trigger,
             algorithm=cfg.algorithm, groups_available=available)
    return run


def _learner_groups(
    session: Session, policy: Policy, snapshot: Snapshot, limit: int | None,
    keep_zero_variance: bool,
) -> Any:
    from workers.learner.data import GradedCompletion, TrainingGroup  # torch: see trainer_config

    query = trainable_groups_query(
        policy, snapshot.id, keep_zero_variance=keep_zero_variance
    ).options(
        selectinload(RolloutGroup.rollouts)
    )
    if limit:
        query = query.limit(limit)
    rows = list(session.scalars(query))
    traces = {
        t.id: t
        for t in session.scalars(select(Trace).where(Trace.id.in_([g.trace_id for g in rows])))
    }
    groups = []
    for g in rows:
        completions = [
            GradedCompletion(
                token_ids=list(r.token_ids),
                text=r.text,
                behaviour_logprob_sum=float(r.behaviour_logprob_sum),
                reward=float(r.reward),
                parse_ok=bool(r.parse_ok),
                behaviour_logprobs=[float(x) for x in r.token_logprobs],
            )
            for r in g.rollouts
            # A rollout the grader could not score has no reward; it is left out, not zeroed.
            if r.status == RolloutStatus.graded and r.reward is not None
        ]
        groups.append(
            TrainingGroup(
                group_id=str(g.id),
                prompt_messages=with_tools(traces[g.trace_id].messages,
                                           (traces[g.trace_id].request or {}).get("tools")),
                completions=completions,
                reference=snapshot.served_name,
                metadata={"trace_id": g.trace_id},
                # π_ref's log-probs were taken at the temperature the group was sampled at.
                temperature=float((g.sampling_params or {}).get("temperature", 1.0)),
            )
        )
    return groups


def _output_dir(policy_name: str, run_id: int, group_digest: str) -> tuple[Path, bool]:
    """Where the adapter goes, and whether a previous attempt of this run already wrote it there
    (written atomically and verified: reuse it instead of training again)."""
    base = get_settings().adapters_dir / policy_name
    target = base / f"run-{run_id}"
    if not target.exists():
        return target, False
    try:
        manifest = adapters.load_verified(target)
        if manifest.get("group_ids_digest") == group_digest:
            return target, True
    except adapters.AdapterIntegrityError:
        pass
    # Never overwrite: a leftover directory that is not ours gets a sibling.
    return base / f"run-{run_id}-{uuid.uuid4().hex[:8]}", False


def _set_run(run_id: int, *, merge_metrics: dict[str, Any] | None = None, **values: Any) -> None:
    with session_scope() as session:
        run = session.get(TrainingRun, run_id)
        if run is not None:
            for k, v in values.items():
                setattr(run, k, v)
            if merge_metrics:
                run.metrics = dict(run.metrics or {}) | merge_metrics


def execute_run(
    run_id: int,
    *,
    check: Callable[[], None] | None = None,
    progress: ProgressFn | None = None,
    enqueue_eval: bool = True,
) -> TrainingRun:
    """Train run ``run_id``; a run that already finished is returned untouched."""
    from workers.learner import launch  # torch: see trainer_config
    from workers.learner.trainer import TrainerConfig, device_problem, on_gpu, train

    with session_scope() as session:
        run = session.get(TrainingRun, run_id)
        if run is None:
            raise PermanentJobError(f"training run {run_id} does not exist")
        if run.status not in ACTIVE_RUN:
            return run
        policy = session.get(Policy, run.policy_id)
        parent = session.get(Snapshot, run.parent_snapshot_id) if run.parent_snapshot_id else None
        if policy is None or parent is None:
            raise PermanentJobError(f"run {run_id}: its policy or parent snapshot is gone")
        max_groups = (policy.training_config or {}).get("max_groups", DEFAULT_MAX_GROUPS)
        try:
            processes = learner_processes(policy.training_config or {})
        except InvalidInput as exc:
            raise PermanentJobError(exc.detail) from exc
        config = TrainerConfig.from_dict(dict(run.config))
        problem = device_problem(config.device, processes)
        if problem is not None:  # no retry helps: the machine has no such GPU
            raise PermanentJobError(problem)
        limit = launch.max_processes(config.device)
        if processes > limit:
            unit = "GPU" if on_gpu(config.device) else "CPU"
            raise PermanentJobError(
                f"the policy asks for {processes} learner processes; this machine runs at most "
                f"{limit} (one per {unit})"
            )
        groups = _learner_groups(session, policy, parent, max_groups,
                                 config.keep_zero_variance_groups)
        run.status, run.started_at, run.heartbeat_at = RunStatus.running, utcnow(), utcnow()
        run.error = None
        policy_name, base_model = policy.name, policy.base_model
        parent_path = parent.adapter_path
    if not groups:
        raise PermanentJobError("no trainable groups left (another run used them)")
    group_ids = [g.group_id for g in groups]
    digest = adapters.group_ids_digest(group_ids)
    out_dir, reuse = _output_dir(policy_name, run_id, digest)

    def _progress(step: int, total: int, metrics: dict[str, float]) -> None:
        if check is not None:
            check()  # between optimizer steps: a stopping worker hands the run back here
        _set_run(run_id, progress=step / max(1, total), heartbeat_at=utcnow(),
                 merge_metrics={"last_step": {k: float(v) for k, v in metrics.items()}})
        if progress is not None:
            progress(step, total, metrics)

    if reuse:
        manifest = adapters.load_verified(out_dir)
        metrics: dict[str, Any] = dict(manifest.get("metrics") or {})
        history: list[dict[str, float]] = []
    else:
        if processes == 1:
            result = train(groups, base_model, out_dir, config, parent=parent_path,
                           progress=_progress)
        else:
            spec = launch.write_round(
                _learner_work_dir(run_id), groups, base_model, out_dir, config, parent_path
            )
            result = _train_in_processes(run_id, processes, spec, check=check,
                                         progress=_progress)
        if result.status != "succeeded" or result.manifest is None:
            _set_run(run_id, status=RunStatus.failed, finished_at=utcnow(),
                     error=result.failure_reason or "training failed", metrics=result.metrics)
            with session_scope() as session:
                return session.get(TrainingRun, run_id)  # type: ignore[return-value]
        manifest, metrics, history = result.manifest, result.metrics, result.history
    if check is not None:
        check()
    return _record_success(
        run_id, out_dir, manifest, metrics, history, group_ids, enqueue_eval=enqueue_eval
    )


def _learner_work_dir(run_id: int) -> Path:
    """A fresh folder per attempt for the round's files and the learner processes' log."""
    return get_settings().data_dir / "runs" / f"run-{run_id}-{uuid.uuid4().hex[:8]}"


def _train_in_processes(
    run_id: int,
    processes: int,
    spec_path: Path,
    *,
    check: Callable[[], None] | None,
    progress: ProgressFn,
) -> Any:
    """Run the round under ``torchrun --nproc_per_node processes`` and return its ``TrainResult``.

    The job keeps its lease while the ranks train: the lease keeper thread renews it, and this
    loop calls ``check`` at least every ``LEARNER_CHECK_S`` (and at every step rank 0 reports), so
    a stopping worker hands the job back within about a second and the ranks are terminated on
    the way out. Their output goes to ``learner.log`` next to the spec and into the ops log."""
    from workers.learner import launch  # torch: see trainer_config

    work = spec_path.parent
    log_path = work / "learner.log"
    # The worker usually started with the learner's allocator already (``tracelearn worker``,
    # ``up``); a run started elsewhere (``tracelearn train`` here, an eager task) gets it for
    # its ranks from here.
    try:
        env = learner_environment(dict(os.environ, PYTHONUNBUFFERED="1"),
                                  get_settings().learner_allocator)
    except AllocatorUnavailable as exc:
        raise PermanentJobError(str(exc)) from exc
    # torchrun's default of one thread per rank would leave cores idle when N < CPUs.
    env.setdefault("OMP_NUM_THREADS", str(max(1, launch.max_processes("cpu") // processes)))

    def handle(events: list[Any]) -> None:
        for event in events:
            if isinstance(event, launch.Progress):
                progress(event.step, event.total, event.metrics)
            else:
                ops.info("run.learner.output", run_id=run_id, line=event[:500])

    try:
        with launch.LearnerProcess(
            launch.torchrun_argv(processes, spec_path), log_path, env
        ) as proc:
            ops.info("run.learner.started", run_id=run_id, processes=processes, pid=proc.pid,
                     log=str(log_path))
            _set_run(run_id, heartbeat_at=utcnow(), merge_metrics={
                "learner": {"processes": processes, "pid": proc.pid, "log": str(log_path)}
            })
            next_check = time.monotonic() + LEARNER_CHECK_S
            try:
                while proc.poll() is None:
                    handle(proc.events(timeout=LEARNER_POLL_S))
                    if time.monotonic() >= next_check:
                        if check is not None:
                            check()
                        _set_run(run_id, heartbeat_at=utcnow())
                        next_check = time.monotonic() + LEARNER_CHECK_S
                handle(proc.finish())
            except BaseException:
                started = time.monotonic()
                proc.terminate()
                ops.info("run.learner.terminated", run_id=run_id, pid=proc.pid,
                         seconds=round(time.monotonic() - started, 2))
                raise
            code = proc.poll()
    finally:
        (work / launch.GROUPS_FILE).unlink(missing_ok=True)  # the rows are the record; keep the log
    ops.info("run.learner.exited", run_id=run_id, returncode=code)
    result_path = work / launch.RESULT_FILE
    if code != 0 or not result_path.exists():
        last_lines = launch.rank_errors(work) or proc.tail()
        raise LearnerFailed(f"{processes} learner processes exited with code {code}; "
                            f"last lines:\n{last_lines[-4000:]}")
    return launch.read_result(result_path)


HISTORY_POINTS = 400
"""Per-step rows kept on a run for the dashboard's curves (a JSON column: bounded)."""


def thin_history(history: list[dict[str, float]], limit: int = HISTORY_POINTS
                 ) -> list[dict[str, float]]:
    """At most ``limit`` rows spread evenly over the whole run, first and last included, so a
    long round's curves still start at step 1 (keeping only the tail hid how a run began)."""
    if len(history) <= limit:
        return list(history)
    last = len(history) - 1
    picks = sorted({round(i * last / (limit - 1)) for i in range(limit)})
    return [history[i] for i in picks]


def _record_success(
    run_id: int,
    out_dir: Path,
    manifest: dict[str, Any],
    metrics: dict[str, Any],
    history: list[dict[str, float]],
    group_ids: list[str],
    *,
    enqueue_eval: bool,
) -> TrainingRun:
    with session_scope() as session:
        run = session.get(TrainingRun, run_id)
        assert run is not None
        policy = session.get(Policy, run.policy_id)
        assert policy is not None
        version = (
            session.scalar(select(func.max(Snapshot.version)).where(Snapshot.policy_id == policy.id))
            or 0
        ) + 1
        snapshot = Snapshot(
            policy_id=policy.id,
            version=version,
            parent_id=run.parent_snapshot_id,
            adapter_path=str(out_dir.resolve()),
            adapter_sha256=str(manifest["weights_sha256"]),
            served_name=served_name(policy.name, version),
            status=SnapshotStatus.candidate,
            training_run_id=run.id,
            manifest=manifest,
        )
        session.add(snapshot)
        session.flush()
        ids = [int(g) for g in group_ids]
        session.execute(
            insert(training_run_groups),
            [{"training_run_id": run.id, "group_id": gid} for gid in ids],
        )
        run.trace_ids = sorted(
            session.scalars(select(RolloutGroup.trace_id).where(RolloutGroup.id.in_(ids)))
        )
        run.group_ids_digest = adapters.group_ids_digest(group_ids)
        run.status, run.progress, run.finished_at = RunStatus.succeeded, 1.0, utcnow()
        run.output_snapshot_id = snapshot.id
        run.metrics = dict(run.metrics or {}) | {"summary": metrics,
                                                 "history": thin_history(history)}
        run.error = None
        record(
            session, policy.tenant, "system:train", "snapshot.create", "snapshot", snapshot.id,
            after={"served_name": snapshot.served_name, "training_run_id": run.id,
                   "groups": len(ids), "adapter_sha256": snapshot.adapter_sha256},
        )
        if policy.serving_snapshot_id != run.parent_snapshot_id:
            # An approval landed while this run trained: its candidate has its verdict already.
            supersede_stale_candidates(session, policy, actor="system:train")
        elif enqueue_eval:
            enqueue(session, JobKind.eval, eval_job_key(snapshot.id),
                    {"snapshot_id": snapshot.id})
        session.flush()
        ops.info("run.finished", run_id=run.id, policy=policy.name, snapshot=snapshot.served_name,
                 groups=len(ids), status=snapshot.status.value)
        return run


def fail_run(run_id: int, error: str) -> None:
    _set_run(run_id, status=RunStatus.failed, finished_at=utcnow(), error=error[:8000])
    ops.warning("run.failed", run_id=run_id, error=error[:500])


def handle_train_job(ctx: JobContext) -> dict[str, Any]:
    run_id = int(ctx.payload["run_id"])
    try:
        run = execute_run(run_id, check=ctx.check)
    except HandedBack:
        # The worker is stopping: the run waits in the queue with its job, as if never started.
        _set_run(run_id, status=RunStatus.queued, progress=0.0, started_at=None)
        raise
    except PermanentJobError as exc:
        fail_run(run_id, str(exc))
        raise
    except Exception as exc:
        # Visible through the API at once; the job decides whether another attempt follows.
        error = f"attempt {ctx.attempt}: {type(exc).__name__}: {exc}"
        if ctx.attempt >= ctx.max_attempts:
            fail_run(run_id, error)
        else:
            _set_run(run_id, error=error)
        raise
    finally:
        # The run's model and optimizer are garbage now (torch modules hold reference cycles);
        # give their pages back, or the worker idles at the run's peak until the next one.
        gc.collect()
        release_free_memory()
        release_gpu_cache()
    return {"run_id": run_id, "status": run.status.value,
            "output_snapshot_id": run.output_snapshot_id}


def fail_orphaned_runs(session: Session) -> list[int]:
    """Runs still queued/running whose train job failed for good (e.g. reaped with no attempts
    left) are marked failed with the job's error, so the API never shows a zombie run."""
    orphans = []
    for run in session.scalars(select(TrainingRun).where(TrainingRun.status.in_(ACTIVE_RUN))):
        job = train_job(session, run.id)
        if job is not None and job.status == JobStatus.failed:
            run.status, run.finished_at = RunStatus.failed, utcnow()
            run.error = job.error or "train job failed"
            orphans.append(run.id)
    return orphans
