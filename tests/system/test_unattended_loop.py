"""The unattended loop: `tracelearn up` with a short schedule, traces posted throughout (a fifth of
their outcomes arriving later through /v1/feedback), and nobody at the console. Every scheduled
round must reach a verdict by itself, no job may fail, and ingest must stay fast meanwhile.

The default suite runs a 2.5-minute version (a round every 20 s, at least two reaching their verdict)
on the embedded default (SQLite + no-server broker) and on Postgres + Redis; the `slow` marker
runs the 6-minute one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from app.models import Job, JobStatus, Policy, Snapshot, SnapshotStatus
from app.settings import get_settings
from benchmarks._common import wait_healthy
from benchmarks.unattended import Traffic
from tests.conftest import REPO, create_pg_database, drop_pg_database, free_port, pg_url_for
from tests.support.seeding import build_model
from workers.clinical import task

pytestmark = pytest.mark.postgres

# The test-size model answers almost every case the same way, so the contract grader would give
# every group equal rewards and no round would ever have data to train on; a grader whose reward
# follows a letter of the sampled text gives groups variance from the real rollouts.
VARIED_GRADER = {"kind": "regex", "outcome": task.OUTCOME_NAME, "pattern": "(e)"}
VERDICTS = {SnapshotStatus.awaiting_approval, SnapshotStatus.rejected, SnapshotStatus.failed,
            SnapshotStatus.superseded, SnapshotStatus.approved, SnapshotStatus.serving,
            SnapshotStatus.retired}


@dataclass
class Service:
    url: str
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    log: Path


def cli(env: dict[str, str], *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=REPO, env=os.environ | env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.fixture(params=["sqlite", "postgres+redis"])
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Service]:
    model = build_model(get_settings().model_cache)
    env = {
        "TRACELEARN_DATA_DIR": str(tmp_path / "data"),
        "TRACELEARN_BASE_MODEL_DIR": str(model),
        "TRACELEARN_LOG_LEVEL": "INFO",
        "TRACELEARN_REAPER_INTERVAL_S": "10",
        "TRACELEARN_JOB_REPLAN_BACKOFF_S": "5",
        "TRACELEARN_RATE_LIMIT_PER_MINUTE": "0",
    }
    database = None
    if request.param == "postgres+redis":
        database = create_pg_database("tl_soak")
        env["TRACELEARN_DATABASE_URL"] = pg_url_for(database)
        env["TRACELEARN_BROKER_URL"] = f"redis://127.0.0.1:6379/{7 + os.getpid() % 8}"
    port = free_port()
    log = tmp_path / "up.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "up", "--port", str(port)],
                                cwd=REPO, env=os.environ | env, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield Service(url, env, proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if database is not None:
            drop_pg_database(database)


def database_url(service: Service) -> str:
    return service.env.get("TRACELEARN_DATABASE_URL") or (
        f"sqlite:///{Path(service.env['TRACELEARN_DATA_DIR']) / 'tracelearn.db'}"
    )


def run_unattended(service: Service, minutes: float, schedule: str, min_rounds: int) -> None:
    key = cli(service.env, "keys", "create", "--tenant", "soak",
              "--scopes", "ingest,read,admin").strip().splitlines()[-1]
    policy = "soak"
    r = httpx.post(f"{service.url}/v1/policies", headers={"Authorization": f"Bearer {key}"},
                   json={"name": policy, "group_size": 4, "schedule": schedule,
                         "grader": VARIED_GRADER,
                         "sampling": {"temperature": 1.0, "max_tokens": 24},
                         "training": {"min_groups": 4, "max_groups": 16}})
    assert r.status_code == 201, r.text
    traffic = Traffic(service.url, key, policy)
    poster = threading.Thread(target=traffic.run, daemon=True)
    poster.start()
    time.sleep(minutes * 60)
    traffic.stop()
    poster.join(timeout=30)

    engine = create_engine(database_url(service))

    def candidates() -> list[Snapshot]:
        with Session(engine) as s:
            policy_id = s.scalars(select(Policy.id).where(Policy.name == policy)).one()
            return list(s.scalars(select(Snapshot).where(Snapshot.policy_id == policy_id,
                                                         Snapshot.version > 0)))

    # Rounds that trained before the traffic stopped get time to reach their verdict.
    deadline = time.monotonic() + 240
    while any(c.status in (SnapshotStatus.candidate, SnapshotStatus.evaluated)
              for c in candidates()) and time.monotonic() < deadline:
        time.sleep(2)
    rounds = candidates()
    with Session(engine) as s:
        failed = list(s.scalars(select(Job).where(Job.status == JobStatus.failed)))

    # Stopping `up` the way systemd does: workers stop, jobs in hand go back to the queue.
    service.proc.send_signal(signal.SIGTERM)
    service.proc.wait(timeout=60)
    with Session(engine) as s:
        running = list(s.scalars(select(Job).where(Job.status == JobStatus.running)))
    engine.dispose()
    log = service.log.read_text()

    summary = {
        "rounds": [(c.served_name, c.status.value, c.status_reason) for c in rounds],
        "failed_jobs": [(j.key, j.error) for j in failed],
        "posted": traffic.posted, "late_outcomes": traffic.late_outcomes,
        "ingest_p50_s": traffic.p(0.5), "ingest_p99_s": traffic.p(0.99),
    }
    print(json.dumps(summary, indent=2))
    assert traffic.errors == []
    assert len(rounds) >= min_rounds, summary
    assert all(c.status in VERDICTS for c in rounds), summary
    assert failed == [], summary
    assert traffic.p(0.99) < 1.0, summary
    assert running == [], [(j.key, j.lease_owner) for j in running]
    assert service.proc.returncode in (0, 128 + signal.SIGTERM), log
    assert "verdict" in log and "run.finished" in log  # the console shows the operational events


def test_every_scheduled_round_reaches_a_verdict_by_itself(service: Service) -> None:
    run_unattended(service, minutes=2.5, schedule="* * * * * */20", min_rounds=2)


@pytest.mark.slow
def test_six_minutes_unattended_on_a_one_minute_schedule(service: Service) -> None:
    run_unattended(service, minutes=6, schedule="* * * * *", min_rounds=3)
