"""Retention deletes traces older than N days, with everything derived from them, and leaves an
audit trail of which adapters had been trained on them.

Purging is global (every tenant) and the test database is shared by the session, so assertions
look only at this test's tenants."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import func, insert, select, update

from app.db import Database, utcnow
from app.models import (
    AuditEvent,
    LangfuseObservation,
    Outcome,
    Policy,
    Rollout,
    RolloutGroup,
    RolloutStatus,
    RunStatus,
    Snapshot,
    SnapshotStatus,
    Trace,
    TrainingRun,
    training_run_groups,
)
from app.retention import ACTOR, purge_expired, retention_pass
from app.settings import Settings
from workers.beat import static_entries

from ._helpers import trace_body


def ingest(client: TestClient, headers: dict[str, str], policy: str, exts: list[str]) -> list[int]:
    batch = {"traces": [trace_body(e, policy, outcome={"name": "ok", "value": True})
                        for e in exts]}
    r = client.post("/v1/traces", json=batch, headers=headers)
    assert r.status_code == 207
    return [item["id"] for item in r.json()["results"]]


def age(database: Database, ids: list[int], days: int) -> None:
    with database.session() as s:
        s.execute(update(Trace).where(Trace.id.in_(ids))
                  .values(created_at=utcnow() - timedelta(days=days)))


def train_on(database: Database, policy: str, trace_id: int) -> tuple[int, int]:
    """A group + rollout for the trace and a succeeded run that used it, with its adapter
    snapshot; returns (run id, snapshot id)."""
    with database.session() as s:
        p = s.scalars(select(Policy).where(Policy.name == policy)).one()
        v0 = p.serving_snapshot_id
        assert v0 is not None
        group = RolloutGroup(trace_id=trace_id, snapshot_id=v0, group_size=1, status="graded")
        s.add(group)
        s.flush()
        s.add(Rollout(group_id=group.id, index=0, text="t", token_ids=[1], token_logprobs=[-0.1],
                      behaviour_logprob_sum=-0.1, status=RolloutStatus.graded, reward=1.0))
        run = TrainingRun(policy_id=p.id, algorithm="oapl", status=RunStatus.succeeded,
                          parent_snapshot_id=v0)
        s.add(run)
        s.flush()
        version = (s.scalar(select(func.max(Snapshot.version))
                            .where(Snapshot.policy_id == p.id)) or 0) + 1
        snap = Snapshot(policy_id=p.id, version=version, parent_id=v0,
                        served_name=f"{policy}-v{version}", status=SnapshotStatus.evaluated,
                        training_run_id=run.id)
        s.add(snap)
        s.flush()
        run.output_snapshot_id = snap.id
        s.execute(insert(training_run_groups).values(training_run_id=run.id, group_id=group.id))
        return run.id, snap.id


def test_old_traces_are_purged_with_their_rollouts_and_the_adapters_are_recorded(
    client: TestClient, database: Database, settings: Settings, make_key: Callable[..., str],
) -> None:
    t1, t2 = f"r1-{uuid.uuid4().hex[:6]}", f"r2-{uuid.uuid4().hex[:6]}"
    h1 = {"Authorization": f"Bearer {make_key(t1)}"}
    h2 = {"Authorization": f"Bearer {make_key(t2)}"}
    p1, p2 = f"p-{uuid.uuid4().hex[:8]}", f"p-{uuid.uuid4().hex[:8]}"
    for h, p in ((h1, p1), (h2, p2)):
        assert client.post("/v1/policies", json={"name": p}, headers=h).status_code == 201
    old1 = ingest(client, h1, p1, ["old-a", "old-b", "old-c"])
    new1 = ingest(client, h1, p1, ["new-a", "new-b"])
    old2 = ingest(client, h2, p2, ["old-z"])
    age(database, old1 + old2, days=45)
    age(database, new1[:1], days=29)  # inside the window: kept
    run_id, snap_id = train_on(database, p1, old1[0])
    other_run, other_snap = train_on(database, p2, old2[0])

    kept = settings.model_copy(update={"retention_days": 30})
    with database.session() as s:
        report = purge_expired(s, kept)
    assert report.by_tenant[t1] == 3 and report.by_tenant[t2] == 1
    assert report.rollouts_deleted >= 2
    assert {run_id, other_run} <= set(report.training_run_ids)
    assert {snap_id, other_snap} <= set(report.adapter_snapshot_ids)

    with database.session() as s:
        remaining = set(s.scalars(select(Trace.id).where(Trace.tenant.in_([t1, t2]))))
        assert remaining == set(new1)
        assert s.scalar(select(func.count()).select_from(Outcome)
                        .where(Outcome.trace_id.in_(old1 + old2))) == 0
        assert s.scalar(select(func.count()).select_from(RolloutGroup)
                        .where(RolloutGroup.trace_id.in_(old1 + old2))) == 0
        # The adapters and their runs stay: only the traces' data goes.
        assert s.get(TrainingRun, run_id) is not None and s.get(Snapshot, snap_id) is not None
        deletes = {e.entity_id: e for e in s.scalars(
            select(AuditEvent).where(AuditEvent.action == "trace.delete",
                                     AuditEvent.tenant.in_([t1, t2])))}
        assert set(deletes) == {str(i) for i in old1 + old2}
        trained = deletes[str(old1[0])]
        assert trained.actor == ACTOR and "retention" in (trained.reason or "")
        assert trained.after["training_run_ids"] == [run_id]
        assert trained.after["adapter_snapshot_ids"] == [snap_id]
        assert deletes[str(old1[1])].after["training_run_ids"] == []
        summaries = {e.tenant: e for e in s.scalars(
            select(AuditEvent).where(AuditEvent.action == "retention.purge",
                                     AuditEvent.tenant.in_([t1, t2])))}
        assert summaries[t1].after["deleted"] == 3
        # Each tenant's summary names only its own runs and adapters.
        assert summaries[t1].after["adapter_snapshot_ids"] == [snap_id]
        assert summaries[t2].after["training_run_ids"] == [other_run]

    # The API agrees: the purged trace is gone for its owner.
    assert client.get(f"/v1/traces/{old1[0]}", headers=h1).status_code == 404
    assert client.get(f"/v1/traces/{new1[0]}", headers=h1).status_code == 200


def test_no_retention_setting_deletes_nothing(
    client: TestClient, database: Database, settings: Settings, admin_headers: dict[str, str],
    policy_name: str,
) -> None:
    ids = ingest(client, admin_headers, policy_name, ["ancient"])
    age(database, ids, days=10_000)
    assert settings.retention_days is None
    with database.session() as s:
        report = purge_expired(s, settings)
    assert report.deleted == 0 and report.cutoff is None and report.by_tenant == {}
    assert client.get(f"/v1/traces/{ids[0]}", headers=admin_headers).status_code == 200


def test_a_limited_pass_deletes_the_oldest_first_and_the_next_pass_continues(
    client: TestClient, database: Database, settings: Settings, admin_headers: dict[str, str],
    policy_name: str,
) -> None:
    ids = ingest(client, admin_headers, policy_name, [f"o{i}" for i in range(5)])
    for i, trace_id in enumerate(ids):
        age(database, [trace_id], days=100 - i)  # ids[0] is the oldest
    with database.session() as s:  # clear older traces other tests left behind
        purge_expired(s, settings.model_copy(update={"retention_days": 1000}))
    kept = settings.model_copy(update={"retention_days": 90})
    with database.session() as s:
        first = purge_expired(s, kept, limit=2, batch_size=1)
    assert first.deleted == 2
    with database.session() as s:
        assert set(s.scalars(select(Trace.id).where(Trace.id.in_(ids)))) == set(ids[2:])
        second = purge_expired(s, kept)
    assert second.deleted == 3
    with database.session() as s:
        assert list(s.scalars(select(Trace.id).where(Trace.id.in_(ids)))) == []


def test_receiver_pieces_waiting_too_long_are_purged_and_fresh_ones_kept(
    database: Database, settings: Settings, tenant: str,
) -> None:
    """A Langfuse generation whose output never came, OTLP events whose span never came: the
    retention pass (what beat sends every ``retention_interval_s``) deletes them once they are
    older than ``staging_retention_hours``, and leaves the ones still waiting."""
    now = utcnow()
    rows = {"stale-gen": ("generation", now - timedelta(hours=200)),
            "stale-events": ("otel-events", now - timedelta(hours=169)),
            "fresh-gen": ("generation", now - timedelta(hours=167))}
    with database.session() as s:
        s.add_all(LangfuseObservation(tenant=tenant, kind=kind, lf_id=lf_id, body={},
                                      created_at=at, updated_at=at)
                  for lf_id, (kind, at) in rows.items())
    assert settings.staging_retention_hours == 168
    report = retention_pass(settings)
    assert report.staged_deleted >= 2 and report.deleted == 0  # retention_days unset: traces kept
    with database.session() as s:
        left = set(s.scalars(select(LangfuseObservation.lf_id)
                             .where(LangfuseObservation.tenant == tenant)))
    assert left == {"fresh-gen"}
    assert static_entries()["retention"] == {
        "task": "tracelearn.retention", "schedule": float(settings.retention_interval_s),
        "options": {"queue": "maintenance"}}
