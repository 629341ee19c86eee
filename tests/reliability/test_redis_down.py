"""Redis (the broker) is down: Postgres is the truth, so ingest still succeeds and planned work is
kept in the outbox (jobs with ``dispatched_at`` NULL); when Redis is back the reaper sends each
job exactly once.

Uses a private redis-server on a free port and a fresh database on the shared Postgres, so
nobody else's broker or jobs are touched.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import select

from app.auth.service import create_key
from app.models import Job, JobKind, JobStatus, Policy

from ._support import PrivateRedis, ThreadedServer
from .conftest import fault_settings, use_settings

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]

def queued_job_ids(r: redis.Redis, queue: str) -> list[int]:
    """Job ids in the Celery messages waiting on ``queue`` (kombu's Redis transport: a list)."""
    ids = []
    for raw in r.lrange(queue, 0, -1):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        args = body[0] if isinstance(body, list) else body["args"]
        ids.append(int(args[0]))
    return ids


def test_ingest_survives_redis_down_and_the_outbox_dispatches_once_it_is_back(
    private_redis: PrivateRedis, fresh_database: str, tmp_path: Path, restore_settings: None
) -> None:
    from app.jobs.service import dispatch_pending, reap
    from app.rollouts.service import plan_regeneration

    settings = fault_settings(
        fresh_database, tmp_path / "data", broker_url=private_redis.url, task_always_eager=False
    )
    database = use_settings(settings)
    with database.session() as s:
        key = create_key(s, "tenant-q", "ingest,read,admin").secret
    h = {"Authorization": f"Bearer {key}"}
    policy = f"p-{uuid.uuid4().hex[:8]}"
    n_traces = 30

    # Redis has never been up: the broker is unreachable from the start.
    with ThreadedServer(settings) as server, httpx.Client(base_url=server.url, headers=h,
                                                           timeout=30) as http:
        assert http.post("/v1/policies", json={
            "name": policy, "training": {"traces_per_job": 8},
        }).status_code == 201
        traces = [{
            "external_id": f"q-{i}", "policy": policy,
            "messages": [{"role": "user", "content": f"case {i}"}], "response": "ANSWER: YES",
            "outcome": {"name": "pfs_gt_180d", "value": i % 2 == 0},
        } for i in range(n_traces)]
        started = time.monotonic()
        r = http.post("/v1/traces", json={"traces": traces})
        assert r.status_code == 207 and r.json()["counts"]["created"] == n_traces, r.text[:300]
        assert time.monotonic() - started < 5, "ingest waited on the broker"
        ready = http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["broker"].startswith("error")
        assert ready.json()["checks"]["database"] == "ok"

    # Plan the work while Redis is down: the rows commit, the send fails and is only logged.
    with database.session() as s:
        p = s.scalars(select(Policy).where(Policy.name == policy)).one()
        planned = [j.id for j in plan_regeneration(s, p)]
    assert len(planned) >= 2
    with database.session() as s:
        jobs = list(s.scalars(select(Job).where(Job.id.in_(planned))))
    assert all(j.kind is JobKind.rollout and j.status is JobStatus.queued for j in jobs)
    assert all(j.dispatched_at is None for j in jobs), "a job claimed dispatch with Redis down"
    covered = sorted(t for j in jobs for t in j.payload["trace_ids"])
    assert len(covered) == len(set(covered))

    # Redis comes back; the reaper (a beat task in production) sends the outbox.
    private_redis.start()
    client = redis.Redis(port=private_redis.port)
    result = reap()
    assert result.redispatched == len(planned)
    assert sorted(queued_job_ids(client, "rollout")) == sorted(planned)
    with database.session() as s:
        assert all(j.dispatched_at is not None
                   for j in s.scalars(select(Job).where(Job.id.in_(planned))))
    # Running it again sends nothing twice; planning again creates no new jobs.
    assert dispatch_pending() == 0
    assert reap().redispatched == 0
    with database.session() as s:
        p = s.scalars(select(Policy).where(Policy.name == policy)).one()
        assert plan_regeneration(s, p) == []
    assert sorted(queued_job_ids(client, "rollout")) == sorted(planned)


def test_redis_dying_between_commit_and_send_leaves_the_job_in_the_outbox(
    private_redis: PrivateRedis, fresh_database: str, tmp_path: Path, restore_settings: None
) -> None:
    from app.jobs.service import enqueue, reap

    settings = fault_settings(
        fresh_database, tmp_path / "data", broker_url=private_redis.url, task_always_eager=False
    )
    database = use_settings(settings)
    private_redis.start()
    client = redis.Redis(port=private_redis.port)
    with database.session() as s:
        first = enqueue(s, JobKind.grade, f"grade:test={uuid.uuid4().hex}", {"group_ids": []}).id
    assert queued_job_ids(client, "grade") == [first]
    private_redis.stop()  # killed: the next send fails after the commit
    with database.session() as s:
        second = enqueue(s, JobKind.grade, f"grade:test={uuid.uuid4().hex}", {"group_ids": []}).id
    with database.session() as s:
        row = s.get(Job, second)
        assert row is not None and row.dispatched_at is None and row.status is JobStatus.queued
    private_redis.start()  # a fresh, empty Redis: the first message was lost with the old one
    client = redis.Redis(port=private_redis.port)
    assert reap().redispatched == 1
    assert queued_job_ids(client, "grade") == [second]
