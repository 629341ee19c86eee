"""Training runs: the API to start and watch them, lineage, and the candidate snapshot."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db import session_scope
from app.engines import reset
from app.models import (
    Job,
    JobKind,
    Policy,
    RolloutGroup,
    Snapshot,
    SnapshotStatus,
    Trace,
    TrainingRun,
    training_run_groups,
)
from app.policies.schemas import DEFAULT_MAX_GROUPS, TrainingSpec
from app.rollouts.service import finish_group
from app.runs.pipeline import run_policy_pipeline
from app.settings import Settings
from tests.conftest import bearer
from tests.support.pipeline import policy_row, seed_policy, vary_rewards
from workers.learner.adapters import load_verified, sha256_file

# Random-init model + "does the completion contain an 'e'" → mixed rewards (-1 / 0) per group.
VARIED_GRADER = {"kind": "regex", "outcome": "pfs_gt_180d", "pattern": "(e)"}


def test_training_run_lifecycle_through_the_api(
    settings: Settings, client: TestClient, model_dir: Path, make_key: Callable[..., str]
) -> None:
    reset()
    name, _ = seed_policy(settings, model_dir, n_traces=4, group_size=4, max_tokens=24,
                          grader=VARIED_GRADER, training={"min_groups": 1, "lr": 1e-3})
    tenant = policy_row(name).tenant
    admin, reader = bearer(make_key(tenant, "admin")), bearer(make_key(tenant, "read"))
    url = f"/v1/policies/{name}/training-runs"

    r = client.post(url, headers=admin)
    assert r.status_code == 409 and "no graded groups" in r.json()["detail"]
    assert client.post(url, headers=reader).status_code == 403

    pipeline = run_policy_pipeline(name, train=False)
    assert pipeline.groups_graded == 4
    vary_rewards(name)

    bad = client.post(url, json={"config": {"lrr": 1}}, headers=admin)
    assert bad.status_code == 422 and "lrr" in bad.json()["detail"]

    r = client.post(url, json={"config": {"epochs": 2, "groups_per_step": 2}}, headers=admin)
    assert r.status_code == 202, r.text
    run_id = r.json()["id"]
    assert r.json()["status"] == "queued" and r.json()["parent_snapshot"] == f"{name}-v0"

    # Eager execution (test settings): the train job ran when the request committed.
    run = client.get(f"/v1/training-runs/{run_id}", headers=reader).json()
    assert run["status"] == "succeeded", run
    assert run["progress"] == 1.0 and run["output_snapshot"] == f"{name}-v1"
    assert run["job_status"] == "succeeded" and run["groups_used"] >= 1
    # One round: every group once per epoch, in steps of 2 groups.
    assert run["epochs"] == 2
    assert run["optimizer_steps"] == 2 * math.ceil(run["groups_used"] / 2)
    assert run["metrics"]["summary"]["optimizer_steps"] == run["optimizer_steps"]

    listed = client.get("/v1/training-runs", params={"policy": name}, headers=reader).json()
    assert [x["id"] for x in listed["items"]] == [run_id]
    other = bearer(make_key(f"{tenant}-other", "read,admin"))
    assert client.get(f"/v1/training-runs/{run_id}", headers=other).status_code == 404
    assert client.post(url, headers=other).status_code == 404

    with session_scope() as s:
        row = s.get(TrainingRun, run_id)
        assert row is not None
        snap = s.get(Snapshot, row.output_snapshot_id)
        assert snap is not None
        assert snap.status == SnapshotStatus.candidate and snap.version == 1
        assert snap.parent_id == policy_row(name).serving_snapshot_id
        assert snap.adapter_sha256 == sha256_file(Path(snap.adapter_path) / "adapter_model.safetensors")
        assert load_verified(snap.adapter_path)["group_ids_digest"] == row.group_ids_digest
        lineage = list(s.scalars(select(training_run_groups.c.group_id)
                                 .where(training_run_groups.c.training_run_id == run_id)))
        assert len(lineage) == run["groups_used"] and len(row.trace_ids) == len(lineage)
        assert s.scalar(select(Job.id).where(Job.kind == JobKind.eval,
                                             Job.key == f"eval:snapshot={snap.id}")) is not None

    # Every group was used: nothing left "since the last run".
    again = client.post(url, headers=admin)
    assert again.status_code == 409


def test_demo_pipeline_regenerates_grades_and_trains_one_update(
    sqlite_settings: Settings, model_dir: Path
) -> None:
    name, _ = seed_policy(sqlite_settings, model_dir, n_traces=3, group_size=4, max_tokens=16,
                          grader=VARIED_GRADER, training={"min_groups": 1})
    seen: list[tuple[str, int, int]] = []
    generated = run_policy_pipeline(name, progress=lambda *a: seen.append(a), train=False)
    assert generated.groups_created == 3 and generated.groups_graded == 3
    assert seen[0] == ("regenerate", 0, 3) and seen[-1] == ("grade", 3, 3)
    vary_rewards(name)
    seen.clear()
    trained = run_policy_pipeline(name, progress=lambda *a: seen.append(a))
    assert trained.groups_created == 0  # nothing pending any more
    assert trained.run_status == "succeeded", trained.error
    assert trained.served_name == f"{name}-v1"
    assert seen[-1] == ("train", 1, 1)


@pytest.mark.parametrize("keep", [False, True])
def test_zero_variance_groups_train_only_when_the_policy_keeps_them(
    sqlite_settings: Settings, model_dir: Path, keep: bool
) -> None:
    name, _ = seed_policy(sqlite_settings, model_dir, n_traces=4, group_size=4, max_tokens=16,
                          grader=VARIED_GRADER,
                          training={"min_groups": 1, "keep_zero_variance_groups": keep})
    assert run_policy_pipeline(name, train=False).groups_graded == 4
    vary_rewards(name)
    with session_scope() as s:  # two of the four groups get equal rewards again
        policy = s.scalars(select(Policy).where(Policy.name == name)).one()
        flat = list(s.scalars(select(RolloutGroup).join(Trace).where(
            Trace.policy_id == policy.id).order_by(RolloutGroup.id).limit(2)))
        for g in flat:
            for r in g.rollouts:
                r.reward = 1.0
            finish_group(g, g.grader_version or "test", 1.0)
    trained = run_policy_pipeline(name)
    assert trained.run_status == "succeeded", trained.error
    # The data trigger counts informative groups either way; the run uses the flat ones too
    # only when the policy keeps them.
    assert trained.trainable_groups == 2
    assert trained.metrics["summary"]["groups_used"] == (4 if keep else 2)


def test_a_run_takes_at_most_max_groups_oldest_first_and_leaves_the_rest_for_the_next_round(
    sqlite_settings: Settings, model_dir: Path
) -> None:
    name, _ = seed_policy(sqlite_settings, model_dir, n_traces=4, group_size=4, max_tokens=16,
                          grader=VARIED_GRADER, training={"min_groups": 1, "max_groups": 3})
    assert run_policy_pipeline(name, train=False).groups_graded == 4
    vary_rewards(name)
    trained = run_policy_pipeline(name)
    assert trained.run_status == "succeeded", trained.error
    assert trained.metrics["summary"]["groups_used"] == 3
    with session_scope() as s:
        policy = s.scalars(select(Policy).where(Policy.name == name)).one()
        oldest = list(s.scalars(select(RolloutGroup.trace_id).join(Trace).where(
            Trace.policy_id == policy.id).order_by(RolloutGroup.id).limit(3)))
        run = s.scalars(select(TrainingRun).where(TrainingRun.policy_id == policy.id)).one()
        assert sorted(run.trace_ids) == sorted(oldest)


def test_a_policy_caps_its_rounds_at_128_groups_unless_told_otherwise() -> None:
    assert TrainingSpec().max_groups == DEFAULT_MAX_GROUPS == 128
    assert TrainingSpec(max_groups=None).max_groups is None
