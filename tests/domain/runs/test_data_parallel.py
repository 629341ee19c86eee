"""A policy that asks for N learner processes: the train job runs the round under torchrun (gloo,
2 processes on CPU) and the run comes out as it does from one process."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from sqlalchemy import select

import app.jobs.service as jobs
from app.db import session_scope
from app.errors import InvalidInput
from app.jobs.service import request_stop, run_job
from app.models import Job, JobStatus, Policy, RunStatus, Snapshot, TrainingRun
from app.policies.schemas import TrainingSpec
from app.runs.pipeline import run_policy_pipeline
from app.runs.training import handle_train_job, start_run, train_job
from app.settings import Settings
from tests.support.pipeline import seed_policy, vary_rewards, wait_until
from workers.learner.adapters import load_verified, sha256_file
from workers.learner.allocator import allocator_in_use

# The stated tolerance of the torchrun test in tests/engines/learner/test_cli_ddp.py: two ranks
# sum the same per-sequence gradients in another order, so the curves agree to fp32 rounding.
LOSS_RTOL = 1e-4
# Weights: the ranks' gradients are summed in another order, and AdamW's early steps (m̂/√v̂,
# about ±lr per entry whatever the gradient's size) turn rounding in a near-zero gradient entry
# into a visible step. So: the mean
# difference must be rounding-sized, and no entry may differ by more than 1% of the farthest
# AdamW can move it (lr × steps). Measured: mean ~3e-8; max 2.9e-5 and 1.1e-4 on two runs.
WEIGHT_MEAN_ATOL = 1e-6
WEIGHT_MAX_SHARE_OF_MOVE = 0.01
VARIED_GRADER = {"kind": "regex", "outcome": "pfs_gt_180d", "pattern": "(e)"}
# 4 groups of 4, 2 groups per step: 8 sequences per step in micro-batches of 4, so each of two
# ranks takes one micro-batch of every step.
ROUND = {"min_groups": 1, "epochs": 2, "groups_per_step": 2, "micro_batch_size": 4, "lr": 1e-2,
         "beta2": 0.05}


def _trainable_policy(settings: Settings, model_dir: Path, **training: Any) -> str:
    name, _ = seed_policy(settings, model_dir, n_traces=4, group_size=4, max_tokens=16,
                          grader=VARIED_GRADER, training=ROUND | training)
    assert run_policy_pipeline(name, train=False).groups_graded == 4
    vary_rewards(name)
    return name


def _set_training(name: str, **values: Any) -> None:
    with session_scope() as s:
        policy = s.scalars(select(Policy).where(Policy.name == name)).one()
        policy.training_config = dict(policy.training_config) | values


def _start(name: str) -> tuple[int, int]:
    """A queued run and its train job, left for the test to run as a worker would."""
    with session_scope() as s:
        policy = s.scalars(select(Policy).where(Policy.name == name)).one()
        run = start_run(s, policy, dispatch=False)
        s.flush()
        job = train_job(s, run.id)
        assert job is not None
        return run.id, job.id


def _run(run_id: int) -> TrainingRun:
    with session_scope() as s:
        run = s.get(TrainingRun, run_id)
        assert run is not None
        return run


def _job(job_id: int) -> Job:
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def _adapter(run: TrainingRun) -> Path:
    with session_scope() as s:
        snap = s.get(Snapshot, run.output_snapshot_id)
        assert snap is not None
        path = Path(snap.adapter_path)
        assert snap.adapter_sha256 == sha256_file(path / "adapter_model.safetensors")
        return path


def test_two_learner_processes_give_the_one_process_run_through_the_train_job(
    sqlite_settings: Settings, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both arms on one thread: the one-process run trains in this process, whose torch thread
    # count earlier tests may have left at 1 or 2, and a matmul sums in another order on two
    # threads (a grad_norm 3.3e-4 apart once, in a full suite). The ranks get one thread each.
    # So pinned, the two curves came out equal to the last bit here.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    name = _trainable_policy(sqlite_settings, model_dir)
    one_id, one_job = _start(name)
    try:
        assert run_job(one_job, handle_train_job) == "succeeded"
    finally:
        torch.set_num_threads(threads)
    one = _run(one_id)
    assert one.status == RunStatus.succeeded and "learner" not in one.metrics
    with session_scope() as s:  # as if that run had failed: its groups are trainable again
        row = s.get(TrainingRun, one_id)
        assert row is not None
        row.status = RunStatus.failed

    _set_training(name, processes=2)
    two_id, two_job = _start(name)
    assert run_job(two_job, handle_train_job) == "succeeded"
    job = _job(two_job)
    assert (job.status, job.attempts) == (JobStatus.succeeded, 1)
    two = _run(two_id)
    assert two.status == RunStatus.succeeded, two.error
    assert two.progress == 1.0 and two.error is None and two.heartbeat_at is not None

    s1, s2 = one.metrics["summary"], two.metrics["summary"]
    assert (s1["world_size"], s2["world_size"]) == (1, 2)
    # The ranks start with the learner's allocator even when the worker itself did not.
    assert (s1["allocator"], s2["allocator"]) == (allocator_in_use(), "jemalloc")
    for key in ("optimizer_steps", "epochs", "groups_used", "groups_dropped_zero_variance"):
        assert s2[key] == s1[key], key
    assert s2["optimizer_steps"] == 4 and s2["epochs"] == 2
    h1, h2 = one.metrics["history"], two.metrics["history"]
    assert len(h1) == len(h2) == 4
    for a, b in zip(h1, h2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=LOSS_RTOL)
    assert two.metrics["last_step"]["step"] == 4.0

    a1, a2 = _adapter(one), _adapter(two)
    assert load_verified(a2)["metrics"]["world_size"] == 2
    w1 = load_file(str(a1 / "adapter_model.safetensors"))
    w2 = load_file(str(a2 / "adapter_model.safetensors"))
    assert w1.keys() == w2.keys()
    max_move = ROUND["lr"] * s1["optimizer_steps"]
    for k in w1:
        diff = (w1[k] - w2[k]).abs()
        assert diff.mean().item() < WEIGHT_MEAN_ATOL, k
        assert diff.max().item() < WEIGHT_MAX_SHARE_OF_MOVE * max_move, k

    learner = two.metrics["learner"]
    assert learner["processes"] == 2 and not psutil.pid_exists(learner["pid"])
    log = Path(learner["log"]).read_text()
    assert "rank 0 done" in log and "rank 1 done" in log
    assert not (Path(learner["log"]).parent / "groups.jsonl").exists()


def test_stopping_the_worker_mid_run_hands_the_job_back_and_ends_every_learner_process(
    pg_settings: Settings, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs, "_stopping", threading.Event())
    # Long enough that the stop lands mid-run: 1 group per step, 40 epochs = 160 steps.
    name = _trainable_policy(pg_settings, model_dir, processes=2, groups_per_step=1, epochs=40)
    run_id, job_id = _start(name)
    tree: list[psutil.Process] = []

    def stop_after_the_first_steps() -> None:
        run = wait_until(lambda: (r := _run(run_id)).progress > 0 and r, timeout=120)
        root = psutil.Process(run.metrics["learner"]["pid"])
        tree.extend([root, *root.children(recursive=True)])
        stopped_at.append(time.monotonic())
        request_stop()  # TERM reaches the worker

    stopped_at: list[float] = []
    stopper = threading.Thread(target=stop_after_the_first_steps, daemon=True)
    stopper.start()
    assert run_job(job_id, handle_train_job) == "handed-back"
    handed_back_after = time.monotonic() - stopped_at[0]
    stopper.join(timeout=5)

    # Within the check interval plus torchrun's own shutdown of its ranks, far below the 30 s
    # after which they would be killed.
    assert handed_back_after < 15, handed_back_after
    assert len(tree) >= 3  # torchrun and its two ranks were seen running
    assert not [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    job = _job(job_id)
    assert (job.status, job.attempts, job.lease_owner) == (JobStatus.queued, 0, None)
    run = _run(run_id)
    assert (run.status, run.progress, run.output_snapshot_id) == (RunStatus.queued, 0.0, None)
    assert not (pg_settings.adapters_dir / name / f"run-{run_id}").exists()
    assert not (Path(run.metrics["learner"]["log"]).parent / "groups.jsonl").exists()


def test_a_learner_process_that_crashes_fails_the_run_with_its_last_lines(
    sqlite_settings: Settings, model_dir: Path, tmp_path: Path
) -> None:
    name = _trainable_policy(sqlite_settings, model_dir, processes=2)
    broken = tmp_path / "broken-base"
    shutil.copytree(model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with session_scope() as s:
        s.scalars(select(Policy).where(Policy.name == name)).one().base_model = str(broken)
    run_id, job_id = _start(name)
    with session_scope() as s:  # one attempt: the failure is final at once
        job = s.get(Job, job_id)
        assert job is not None
        job.max_attempts = 1

    assert run_job(job_id, handle_train_job) == "failed"
    run = _run(run_id)
    assert run.status == RunStatus.failed and run.output_snapshot_id is None
    assert run.error is not None and "LearnerFailed: 2 learner processes exited" in run.error
    # The ranks' own error comes first (torchrun's summary names only exit codes); which ranks
    # got as far as raising before torchrun stopped the others is a race.
    first = run.error.splitlines()[1]
    assert first.startswith("rank ") and "SafetensorError: Error while deserializing" in first
    assert _job(job_id).status == JobStatus.failed


def test_a_run_asking_for_more_learner_processes_than_cpus_fails_with_the_reason(
    sqlite_settings: Settings, model_dir: Path
) -> None:
    name = _trainable_policy(sqlite_settings, model_dir, processes=psutil.cpu_count() + 1)
    run_id, job_id = _start(name)
    assert run_job(job_id, handle_train_job) == "failed"
    run = _run(run_id)
    assert run.status == RunStatus.failed
    assert run.error is not None and "this machine runs at most" in run.error


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has the GPU asked for")
def test_a_run_asking_for_a_gpu_the_machine_lacks_fails_at_once_with_the_reason(
    sqlite_settings: Settings, model_dir: Path
) -> None:
    name = _trainable_policy(sqlite_settings, model_dir, device="cuda")
    run_id, job_id = _start(name)
    assert run_job(job_id, handle_train_job) == "failed"
    run = _run(run_id)
    assert run.status == RunStatus.failed
    assert run.error == "device 'cuda' was asked for, but torch sees no GPU on this machine"
    job = _job(job_id)
    assert job.status == JobStatus.failed and job.attempts == 1  # permanent: never retried


def test_processes_is_a_positive_integer_set_on_the_policy(
    sqlite_settings: Settings, model_dir: Path
) -> None:
    assert TrainingSpec().processes == 1
    with pytest.raises(ValidationError, match="processes"):
        TrainingSpec(processes=0)
    name, _ = seed_policy(sqlite_settings, model_dir, n_traces=1)
    with session_scope() as s:
        policy = s.scalars(select(Policy).where(Policy.name == name)).one()
        with pytest.raises(InvalidInput, match="policy setting"):
            start_run(s, policy, overrides={"processes": 2})
        policy.training_config = {"processes": "two"}
        with pytest.raises(InvalidInput, match="processes must be an integer >= 1, got 'two'"):
            start_run(s, policy)
