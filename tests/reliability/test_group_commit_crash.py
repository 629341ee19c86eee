"""Postgres crashes and comes back under a stream of concurrent single-trace POSTs, which the
group writer commits many at a time.

A group that was being written when the database died is answered 503 + Retry-After to every
request in it (never a 2xx before the commit, never a 500, never a hang); after the restart the
writer carries on, and every trace a client saw acknowledged is stored exactly once."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest

from app.auth.service import create_key

from ._support import PrivateCluster, ThreadedServer
from .conftest import fault_settings, use_settings

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]

CLIENTS = 8


@dataclass
class ClientLog:
    acknowledged: set[str] = field(default_factory=set)
    statuses: Counter[int] = field(default_factory=Counter)
    retry_after: set[str] = field(default_factory=set)
    unexpected: list[str] = field(default_factory=list)
    acked_at: list[float] = field(default_factory=list)


def trace(ext: str, policy: str) -> dict[str, object]:
    return {"external_id": ext, "policy": policy,
            "messages": [{"role": "user", "content": f"note {ext}"}],
            "response": "ANSWER: YES", "outcome": {"name": "ok", "value": True}}


def client_loop(url: str, key: str, policy: str, stop: threading.Event, log: ClientLog) -> None:
    """Send fresh single traces; on 503 resend the same one (idempotent on external_id)."""
    prefix = uuid.uuid4().hex[:8]
    n = 0
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"},
                      timeout=httpx.Timeout(15.0)) as http:
        while not stop.is_set():
            ext = f"{prefix}-{n}"
            n += 1
            while not stop.is_set():
                try:
                    r = http.post("/v1/traces", json=trace(ext, policy))
                except httpx.TransportError as exc:
                    log.unexpected.append(f"transport: {exc!r}")
                    time.sleep(0.2)
                    continue
                log.statuses[r.status_code] += 1
                if r.status_code in (200, 201):
                    log.acknowledged.add(ext)
                    log.acked_at.append(time.monotonic())
                    break
                if r.status_code == 503:
                    log.retry_after.add(r.headers.get("Retry-After", ""))
                    time.sleep(0.1)
                    continue
                log.unexpected.append(f"{r.status_code}: {r.text[:300]}")
                time.sleep(0.1)


def test_postgres_crash_under_grouped_single_traces_loses_and_duplicates_nothing(
    private_pg: PrivateCluster, tmp_path: Path, restore_settings: None
) -> None:
    url = private_pg.create_database(f"tl_gc_{uuid.uuid4().hex[:8]}")
    settings = fault_settings(url, tmp_path / "data", group_commit_window_ms=5.0)
    database = use_settings(settings)
    with database.session() as s:
        key = create_key(s, "tenant-g", "ingest,read,admin").secret
    policy = f"p-{uuid.uuid4().hex[:8]}"
    logs = [ClientLog() for _ in range(CLIENTS)]
    stop = threading.Event()
    with ThreadedServer(settings) as server:
        r = httpx.post(f"{server.url}/v1/policies", json={"name": policy},
                       headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 201, r.text
        threads = [threading.Thread(target=client_loop, args=(server.url, key, policy, stop, lg))
                   for lg in logs]
        for t in threads:
            t.start()
        try:
            time.sleep(2.0)
            crashed_at = time.monotonic()
            private_pg.stop("immediate")
            time.sleep(2.0)
            down = sum((lg.statuses for lg in logs), Counter())
            private_pg.start()
            restarted_at = time.monotonic()
            deadline = restarted_at + 30
            while time.monotonic() < deadline:
                if all(sum(1 for t in lg.acked_at if t > restarted_at) >= 5 for lg in logs):
                    break
                time.sleep(0.2)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
            private_pg.start()
    assert all(not t.is_alive() for t in threads), "a client hung"

    statuses = sum((lg.statuses for lg in logs), Counter())
    acknowledged = set().union(*(lg.acknowledged for lg in logs))
    assert [u for lg in logs for u in lg.unexpected] == []
    assert set(statuses) <= {200, 201, 503}, statuses
    assert down[503] > 0, "no request ever saw the database down"
    assert {h for lg in logs for h in lg.retry_after} == {"5"}
    assert all(any(t > restarted_at for t in lg.acked_at) for lg in logs), "no recovery"
    assert any(t < crashed_at for lg in logs for t in lg.acked_at)

    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT external_id, xmin::text FROM traces WHERE tenant = %s",
                            ("tenant-g",)).fetchall()
        outcomes = Counter(ext for (ext,) in conn.execute(
            "SELECT trace_external_id FROM outcomes WHERE tenant = %s AND trace_id IS NOT NULL",
            ("tenant-g",)))
    stored = Counter(ext for ext, _ in rows)
    assert acknowledged - set(stored) == set(), "an acknowledged trace was lost"
    assert max(stored.values()) == 1
    assert set(outcomes) == set(stored) and max(outcomes.values()) == 1
    commits = len({xid for _, xid in rows})
    assert commits < len(rows), "no two traces ever shared a commit"
    print(f"\ngroup-commit crash: {len(acknowledged)} acknowledged, {len(rows)} stored by "
          f"{commits} commits, statuses {dict(statuses)}")
