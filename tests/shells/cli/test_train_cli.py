"""`tracelearn train --policy NAME` and `tracelearn train-offline`: a round trained in the
command's own process, which restarts itself on the learner's allocator first."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from app.cli.processes import settings_env
from app.db import session_scope
from app.models import RunStatus, TrainingRun
from app.runs.pipeline import run_policy_pipeline
from app.settings import Settings
from tests.support.pipeline import policy_row, seed_policy, vary_rewards
from workers.learner.adapters import load_verified
from workers.learner.data import TrainingGroup, dump_groups_jsonl

REPO = Path(__file__).resolve().parents[3]
VARIED_GRADER = {"kind": "regex", "outcome": "pfs_gt_180d", "pattern": "(e)"}
ROUND = {"min_groups": 1, "epochs": 1, "groups_per_step": 2, "micro_batch_size": 4}


def test_train_here_runs_one_round_on_jemalloc(sqlite_settings: Settings, model_dir: Path) -> None:
    name, _ = seed_policy(sqlite_settings, model_dir, n_traces=2, group_size=4, max_tokens=12,
                          grader=VARIED_GRADER, training=ROUND)
    assert run_policy_pipeline(name, train=False).groups_graded == 2
    vary_rewards(name)
    # The test process itself is on glibc: the command has to restart itself.
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "train", "--policy", name],
        env=env | settings_env(sqlite_settings), cwd=REPO, capture_output=True, text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    with session_scope() as s:
        run = s.scalars(select(TrainingRun).where(
            TrainingRun.policy_id == policy_row(name).id)).one()
        assert run.status == RunStatus.succeeded and run.trigger == "cli"
        summary = run.metrics["summary"]
    assert f"run {run.id}: succeeded" in out.stderr  # the console is stderr
    assert (summary["allocator"], summary["world_size"], summary["optimizer_steps"]) == (
        "jemalloc", 1, 1)


def test_train_offline_restarts_itself_on_jemalloc(
    tiny_model_dir: Path, make_groups: Callable[..., list[TrainingGroup]], tmp_path: Path
) -> None:
    groups = tmp_path / "groups.jsonl"
    dump_groups_jsonl(make_groups(n_prompts=4, group_size=4, seed=5), groups)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "train-offline", "--groups", str(groups),
         "--base", str(tiny_model_dir), "--out", str(tmp_path / "adapter"), "--epochs", "1",
         "--groups-per-step", "4", "--config", str(_keep_zero_variance(tmp_path))],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    metrics = load_verified(tmp_path / "adapter")["metrics"]
    assert (metrics["allocator"], metrics["optimizer_steps"]) == ("jemalloc", 1)


def _keep_zero_variance(tmp_path: Path) -> Path:
    """The weak test model's groups may all score alike; kept, the round still has a step."""
    path = tmp_path / "config.json"
    path.write_text('{"keep_zero_variance_groups": true}')
    return path
