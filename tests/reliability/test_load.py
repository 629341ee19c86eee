"""Load on loopback against the real API process (uvicorn, Postgres): idempotency at volume and
many concurrent clients without a single error. Reports p99 latency and throughput.

The default suite runs a short version (10 s); the slow run the 60 s one the issue asks for.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest

from app.settings import Settings
from tests.conftest import api_process

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def db_url(pg_url: str) -> str:
    return pg_url


@pytest.fixture(scope="module")
def api_url(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`tracelearn api` in its own process, so the clients' threads do not share its GIL;
    started once for the module (it takes seconds to import)."""
    tmp_path = tmp_path_factory.mktemp("load-api")
    env = {"TRACELEARN_DATABASE_URL": pg_url, "TRACELEARN_DATA_DIR": str(tmp_path / "data"),
           "TRACELEARN_LOG_LEVEL": "WARNING", "TRACELEARN_RATE_LIMIT_PER_MINUTE": "0",
           "TRACELEARN_MAX_BODY_BYTES": "8000000"}
    with api_process(env, tmp_path / "api.log") as url:
        yield url


def trace(ext: str, policy: str) -> dict[str, object]:
    return {"external_id": ext, "policy": policy,
            "messages": [{"role": "user", "content": f"64-year-old, ECOG 1, case {ext}"}],
            "response": "Overall favourable. ANSWER: YES"}


def test_the_same_10k_traces_sent_twice_store_exactly_10k_rows(
    api_url: str, settings: Settings, make_key: Callable[..., str], tenant: str
) -> None:
    h = {"Authorization": f"Bearer {make_key(tenant)}"}
    policy = f"load-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=api_url, headers=h, timeout=120) as http:
        assert http.post("/v1/policies", json={"name": policy}).status_code == 201
        batches = [[trace(f"t{b * 1000 + i:05d}", policy) for i in range(1000)]
                   for b in range(10)]
        totals: list[dict[str, int]] = []
        for _pass in range(2):
            counts = {"created": 0, "duplicate": 0, "conflict": 0, "invalid": 0}
            for batch in batches:
                r = http.post("/v1/traces", json={"traces": batch})
                assert r.status_code == 207, r.text[:300]
                for k, v in r.json()["counts"].items():
                    counts[k] += v
            totals.append(counts)
    assert totals[0] == {"created": 10_000, "duplicate": 0, "conflict": 0, "invalid": 0}
    assert totals[1] == {"created": 0, "duplicate": 10_000, "conflict": 0, "invalid": 0}
    dsn = settings.resolved_database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*), count(DISTINCT external_id) FROM traces "
                           "WHERE tenant = %s", (tenant,)).fetchone()
    assert row == (10_000, 10_000)


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    traces: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def run_clients(api_url: str, keys: list[str], policy: str, seconds: float,
                batch: int) -> tuple[Tally, float]:
    tally = Tally()
    stop = threading.Event()

    def client(key: str, n: int) -> None:
        h = {"Authorization": f"Bearer {key}"}
        i = 0
        with httpx.Client(base_url=api_url, headers=h, timeout=60) as http:
            while not stop.is_set():
                body = {"traces": [trace(f"c{n}-{i + j}", policy) for j in range(batch)]}
                i += batch
                start = time.perf_counter()
                try:
                    r = http.post("/v1/traces", json=body)
                except httpx.HTTPError as exc:
                    with tally.lock:
                        tally.errors.append(f"transport: {exc!r}")
                    continue
                elapsed = time.perf_counter() - start
                with tally.lock:
                    if r.status_code != 207 or r.json()["counts"]["created"] != batch:
                        tally.errors.append(f"{r.status_code}: {r.text[:200]}")
                    else:
                        tally.latencies.append(elapsed)
                        tally.traces += batch

    threads = [threading.Thread(target=client, args=(k, n)) for n, k in enumerate(keys)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=90)
    return tally, time.perf_counter() - began


def concurrent_clients(api_url: str, make_key: Callable[..., str], tenant: str, seconds: float,
                       out: Path) -> dict[str, float]:
    keys = [make_key(tenant, "ingest") for _ in range(50)]
    admin = {"Authorization": f"Bearer {make_key(tenant)}"}
    policy = f"load-{uuid.uuid4().hex[:8]}"
    assert httpx.post(f"{api_url}/v1/policies", json={"name": policy}, headers=admin,
                      timeout=30).status_code == 201
    tally, wall = run_clients(api_url, keys, policy, seconds, batch=5)
    lat = sorted(tally.latencies)
    report = {
        "clients": 50, "seconds": round(wall, 2), "requests": len(lat),
        "errors": len(tally.errors), "traces": tally.traces,
        "requests_per_s": round(len(lat) / wall, 1), "traces_per_s": round(tally.traces / wall, 1),
        "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
        "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None,
    }
    out.write_text(json.dumps(report, indent=2))
    print(f"\nload: {json.dumps(report)}")
    assert tally.errors == [], tally.errors[:5]
    assert len(lat) > 50, "the clients barely got through"
    return report  # type: ignore[return-value]


def test_50_concurrent_clients_for_10s_see_no_errors(
    api_url: str, make_key: Callable[..., str], tenant: str, tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    report = concurrent_clients(api_url, make_key, tenant, 10.0, tmp_path / "load.json")
    for k, v in report.items():
        record_property(k, v)


@pytest.mark.slow
def test_50_concurrent_clients_for_60s_see_no_errors(
    api_url: str, make_key: Callable[..., str], tenant: str, tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    report = concurrent_clients(api_url, make_key, tenant, 60.0, tmp_path / "load.json")
    for k, v in report.items():
        record_property(k, v)
