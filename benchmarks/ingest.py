"""Trace ingest over HTTP into Postgres, against ``COPY`` of the same rows, in one run.

    python -m benchmarks.ingest [--batches 6] [--batch-size 1000] [--profile]

1. **Batch ingest.** A real uvicorn server (a subprocess, the app from ``create_app``, settings
   from ``TRACELEARN_*``) on a scratch Postgres database. ``--batches`` batches of ``--batch-size``
   clinical traces (deterministic: ``workers.clinical.task.ingest_items(seed=0)``) are POSTed to
   ``/v1/traces`` one after another. After each HTTP batch, the very rows it stored are read back and
   written again with psycopg ``COPY … FROM STDIN`` into the same ``traces`` table (under another
   tenant, so nothing conflicts), in its own transaction. The two alternate, so the table grows the
   same way under both. Reported: rows/s of each (median over batches) and their ratio.
   Inline outcomes are left out of the headline items (COPY would not write them); a second,
   smaller pass with outcomes attached reports HTTP traces+outcomes against COPY into both tables.
2. **Single-trace latency.** Closed-loop load generator: C client threads (C = 1, 10, 50), each
   with its own keep-alive ``httpx.Client``, each sending single-trace POSTs back to back; a fixed
   number of requests per level and a wall-clock cap. Reported: p50/p90/p99 ms and requests/s.

``--profile`` samples the server process with py-spy (all threads) during both phases and writes
the top frames to ``results/ingest_profile_*.txt``. The ratios are printed last.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg

from benchmarks._common import (
    agg_backend,
    machine,
    median,
    percentile,
    print_ratios,
    results_dir,
    stop_process,
    wait_healthy,
    write_json,
)

PG_ADMIN_DSN = os.environ.get(
    "TRACELEARN_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
POLICY = "clinical-pfs"
TRACE_COLUMNS = (
    "tenant", "external_id", "policy_id", "messages", "response", "model", "snapshot_id",
    "metadata", "split", "redactions", "content_hash", "occurred_at", "created_at",
)
OUTCOME_COLUMNS = (
    "tenant", "trace_external_id", "trace_id", "name", "value", "source", "created_at",
    "updated_at", "origin", "labelled_at",
)


@dataclass(frozen=True)
class IngestConfig:
    batch_size: int = 1000
    """Traces per HTTP request (the API's default limit)."""
    batches: int = 6
    """Measured batches per mode (plus one warm-up batch each, not counted)."""
    outcome_batches: int = 2
    """Batches of the secondary pass with inline outcomes (0 skips it)."""
    clients: tuple[int, ...] = (1, 10, 50)
    requests_per_level: int = 1000
    """Single-trace POSTs per concurrency level (split evenly over the clients)."""
    min_requests_per_client: int = 20
    level_cap_s: float = 45.0
    """Wall-clock cap per concurrency level; a level stops early when it is hit."""
    server_workers: int = 1
    """uvicorn worker processes."""
    seed: int = 0
    profile: bool = False


# ------------------------------------------------------------------ scratch database and server


def create_database() -> str:
    name = f"tl_bench_ingest_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``uvicorn app.main:create_app --factory`` in a subprocess, configured by environment."""

    def __init__(self, database_url: str, data_dir: Path, workers: int = 1) -> None:
        self.port = _free_port()
        env = dict(os.environ)
        env.update(
            TRACELEARN_DATABASE_URL=database_url,
            TRACELEARN_DATA_DIR=str(data_dir),
            TRACELEARN_RATE_LIMIT_PER_MINUTE="0",  # the load generator is one key
            TRACELEARN_LOG_LEVEL="WARNING",
            TRACELEARN_ENVIRONMENT="test",
        )
        self.cmd = [
            sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers),
            "--log-level", "warning", "--no-access-log",
        ]
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=Path(__file__).resolve().parents[1])
        wait_healthy(self.url, self.proc, timeout_s=60)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGINT)


class Profiler:
    """py-spy sampling every thread of the server process (``--profile``)."""

    def __init__(self, pid: int, out: Path, enabled: bool) -> None:
        self.pid, self.out, self.enabled = pid, out, enabled
        self.proc: subprocess.Popen[bytes] | None = None
        self.raw = out.with_suffix(".raw")

    def __enter__(self) -> Profiler:
        spy = Path(sys.executable).parent / "py-spy"
        if self.enabled and not spy.exists():
            print(f"no py-spy at {spy} (pip install -e '.[bench]'): measuring without the "
                  "server profile", flush=True)
        elif self.enabled:
            self.proc = subprocess.Popen(
                [str(spy), "record", "--pid", str(self.pid), "--format", "raw", "--rate", "250",
                 "--subprocesses", "--output", str(self.raw)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if self.raw.exists():
            self.out.write_text(summarise_collapsed(self.raw.read_text()))

    @property
    def summary(self) -> str | None:
        return self.out.read_text() if self.out.exists() else None


def summarise_collapsed(text: str, top: int = 35) -> str:
    """Inclusive and self sample shares per frame from py-spy's collapsed stacks, idle threads
    (waiting on a lock, a socket or the event loop's selector) dropped."""
    idle_markers = ("wait (threading.py", "select (selectors.py", "_worker (concurrent",
                    "run_forever (asyncio", "_run_once (asyncio")
    inclusive: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        leaf = frames[-1]
        if any(m in leaf for m in idle_markers):
            continue
        n = int(count)
        total += n
        self_[leaf] += n
        for f in set(frames[1:]):
            inclusive[f] += n
    lines = [f"busy samples: {total}", "", "top inclusive (share of busy samples):"]
    for f, n in inclusive.most_common(top):
        lines.append(f"  {100 * n / max(total, 1):5.1f}%  {f}")
    lines += ["", "top self:"]
    for f, n in self_.most_common(top):
        lines.append(f"  {100 * n / max(total, 1):5.1f}%  {f}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ data


def make_items(seed: int, n: int, prefix: str, outcomes: bool) -> list[dict[str, Any]]:
    from workers.clinical.task import ingest_items

    items = ingest_items(seed, n, "train", POLICY)
    for it in items:
        it["external_id"] = f"{prefix}-{it['external_id']}"
        if not outcomes:
            it.pop("outcome", None)
    return items


def setup(database_url: str, data_dir: Path) -> tuple[str, str]:
    """Migrate, create one API key per tenant role; returns (key, tenant)."""
    from app import migrate
    from app.auth.service import create_key
    from app.db import Database
    from app.settings import Settings

    migrate.upgrade(database_url)
    tenant = "bench"
    settings = Settings(database_url=database_url, data_dir=data_dir, environment="test")
    db = Database(settings)
    try:
        with db.session() as session:
            key = create_key(session, tenant, "ingest,read,admin", name="bench").secret
    finally:
        db.dispose()
    return key, tenant


def _stored_rows(conn: psycopg.Connection[Any], tenant: str, ext_ids: Sequence[str]) -> list[Any]:
    cols = ", ".join(f'"{c}"' for c in TRACE_COLUMNS)
    return conn.execute(
        f"SELECT {cols} FROM traces WHERE tenant = %s AND external_id = ANY(%s)",
        (tenant, list(ext_ids)),
    ).fetchall()


def _stored_outcomes(conn: psycopg.Connection[Any], tenant: str, ext_ids: Sequence[str]) -> list[Any]:
    cols = ", ".join(f'"{c}"' for c in OUTCOME_COLUMNS)
    return conn.execute(
        f"SELECT {cols} FROM outcomes WHERE tenant = %s AND trace_external_id = ANY(%s)",
        (tenant, list(ext_ids)),
    ).fetchall()


def _json_text(v: Any) -> Any:
    return orjson.dumps(v).decode() if isinstance(v, (dict, list)) else v


def copy_rows(
    conn: psycopg.Connection[Any], rows: list[Any], outcomes: list[Any], tenant: str
) -> float:
    """COPY the given rows (Python values, as read back) under ``tenant``; seconds taken,
    including serialising the JSON columns and the commit."""
    t0 = time.perf_counter()
    with conn.transaction():
        cur = conn.cursor()
        cols = ", ".join(f'"{c}"' for c in TRACE_COLUMNS)
        with cur.copy(f"COPY traces ({cols}) FROM STDIN") as cp:
            for r in rows:
                cp.write_row((tenant, *[_json_text(v) for v in r[1:]]))
        if outcomes:
            # trace ids of the copied rows, as an ingest would attach them
            ids = dict(conn.execute(
                "SELECT external_id, id FROM traces WHERE tenant = %s AND external_id = ANY(%s)",
                (tenant, [o[1] for o in outcomes]),
            ).fetchall())
            ocols = ", ".join(f'"{c}"' for c in OUTCOME_COLUMNS)
            with cur.copy(f"COPY outcomes ({ocols}) FROM STDIN") as cp:
                for o in outcomes:
                    # o = (tenant, ext, trace_id, name, value (JSON), source, created, updated,
                    #      origin, labelled_at)
                    cp.write_row((tenant, o[1], ids.get(o[1]), o[3], orjson.dumps(o[4]).decode(),
                                  *o[5:]))
    return time.perf_counter() - t0


# ------------------------------------------------------------------ phase 1: batches


def run_batches(
    server_url: str, key: str, tenant: str, pg_dsn: str, cfg: IngestConfig, outcomes: bool,
    n_batches: int,
) -> dict[str, Any]:
    tag = "o" if outcomes else "b"
    items = make_items(cfg.seed, cfg.batch_size * (n_batches + 1), f"{tag}", outcomes)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    http_s: list[float] = []
    copy_s: list[float] = []
    body_bytes = 0
    with httpx.Client(base_url=server_url, timeout=120) as client, psycopg.connect(pg_dsn, autocommit=True) as conn:
        for b in range(n_batches + 1):
            chunk = items[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            body = orjson.dumps({"traces": chunk})
            body_bytes = len(body)
            t0 = time.perf_counter()
            r = client.post("/v1/traces", content=body, headers=headers)
            r.raise_for_status()
            counts = r.json()["counts"]
            dt = time.perf_counter() - t0
            if counts.get("created") != len(chunk):
                raise RuntimeError(f"batch {b}: expected {len(chunk)} created, got {counts}")
            ext = [it["external_id"] for it in chunk]
            # FastAPI ≥0.118 runs a yield dependency's exit (our commit) after the response is
            # sent, so the rows may land a moment after the 207: wait for them (untimed).
            rows = _stored_rows(conn, tenant, ext)
            waited = time.perf_counter()
            while len(rows) < len(chunk) and time.perf_counter() - waited < 30:
                time.sleep(0.01)
                rows = _stored_rows(conn, tenant, ext)
            outs = _stored_outcomes(conn, tenant, ext) if outcomes else []
            if len(rows) != len(chunk):
                raise RuntimeError(f"batch {b}: {len(rows)} rows stored for {len(chunk)}")
            dc = copy_rows(conn, rows, outs, f"copy-{tag}")
            if b > 0:  # the first batch warms both paths up
                http_s.append(dt)
                copy_s.append(dc)
    n = cfg.batch_size
    http_rps = [n / s for s in http_s]
    copy_rps = [n / s for s in copy_s]
    return {
        "batch_size": n,
        "batches": n_batches,
        "inline_outcomes": outcomes,
        "request_body_bytes": body_bytes,
        "http_seconds": [round(s, 4) for s in http_s],
        "copy_seconds": [round(s, 4) for s in copy_s],
        "http_rows_per_s": round(median(http_rps), 1),
        "copy_rows_per_s": round(median(copy_rps), 1),
        # ratio of medians; per-pair ratios show the spread under a noisy machine
        "ratio": round(median(http_rps) / median(copy_rps), 4),
        "pair_ratios": [round(c / h, 4) for h, c in zip(http_s, copy_s, strict=True)],
    }


# ------------------------------------------------------------------ phase 2: latency


def run_latency(server_url: str, key: str, cfg: IngestConfig) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    template = make_items(cfg.seed + 1, 1, "lat", outcomes=True)[0]
    levels = []
    for c in cfg.clients:
        per_client = max(cfg.min_requests_per_client, cfg.requests_per_level // c)
        bodies = [
            [
                orjson.dumps(template | {"external_id": f"lat-c{c}-t{t}-{i}"})
                for i in range(per_client)
            ]
            for t in range(c)
        ]
        latencies: list[list[float]] = [[] for _ in range(c)]
        errors = [0] * c
        start_gate = threading.Barrier(c + 1)
        deadline = [0.0]

        def client_loop(
            t: int, c: int = c, bodies: list[list[bytes]] = bodies,
            latencies: list[list[float]] = latencies, errors: list[int] = errors,
            start_gate: threading.Barrier = start_gate, deadline: list[float] = deadline,
        ) -> None:
            with httpx.Client(base_url=server_url, timeout=30, headers=headers) as client:
                # one warm-up request per client (connection set-up), not recorded
                client.post("/v1/traces", content=orjson.dumps(
                    template | {"external_id": f"lat-warm-c{c}-t{t}"}))
                start_gate.wait()
                for body in bodies[t]:
                    if time.perf_counter() > deadline[0]:
                        break
                    t0 = time.perf_counter()
                    r = client.post("/v1/traces", content=body)
                    latencies[t].append(time.perf_counter() - t0)
                    if r.status_code != 201:
                        errors[t] += 1

        threads = [threading.Thread(target=client_loop, args=(t,)) for t in range(c)]
        for th in threads:
            th.start()
        deadline[0] = time.perf_counter() + cfg.level_cap_s + 60  # provisional, until the gate
        start_gate.wait()
        t_start = time.perf_counter()
        deadline[0] = t_start + cfg.level_cap_s
        for th in threads:
            th.join()
        wall = time.perf_counter() - t_start
        flat = [x * 1000 for lat in latencies for x in lat]
        levels.append(
            {
                "clients": c,
                "requests": len(flat),
                "planned_requests": c * per_client,
                "errors": sum(errors),
                "seconds": round(wall, 2),
                "requests_per_s": round(len(flat) / wall, 1),
                "p50_ms": round(percentile(flat, 50), 2),
                "p90_ms": round(percentile(flat, 90), 2),
                "p99_ms": round(percentile(flat, 99), 2),
                "max_ms": round(max(flat), 2) if flat else None,
            }
        )
    return levels


# ------------------------------------------------------------------ the whole benchmark


def run(cfg: IngestConfig, out_dir: str | Path | None = None) -> dict[str, Any]:
    started_on = machine()
    out = results_dir(out_dir)
    name = create_database()
    db_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    pg_dsn = f"postgresql://postgres@127.0.0.1:5432/{name}"
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="tl-bench-ingest-") as tmp:
            key, tenant = setup(db_url, Path(tmp))
            with Server(db_url, Path(tmp), cfg.server_workers) as server:
                httpx.post(
                    f"{server.url}/v1/policies", json={"name": POLICY},
                    headers={"Authorization": f"Bearer {key}"}, timeout=30,
                ).raise_for_status()
                assert server.proc is not None
                with Profiler(server.proc.pid, out / "ingest_profile_batch.txt", cfg.profile):
                    batch = run_batches(server.url, key, tenant, pg_dsn, cfg, False, cfg.batches)
                with_outcomes = (
                    run_batches(server.url, key, tenant, pg_dsn, cfg, True, cfg.outcome_batches)
                    if cfg.outcome_batches
                    else None
                )
                with Profiler(server.proc.pid, out / "ingest_profile_latency.txt", cfg.profile):
                    latency = run_latency(server.url, key, cfg)
    finally:
        drop_database(name)
    at50 = next((lv for lv in latency if lv["clients"] == max(cfg.clients)), latency[-1])
    result: dict[str, Any] = {
        "benchmark": "ingest",
        "config": asdict(cfg),
        "machine": started_on,
        "seconds": round(time.perf_counter() - t0, 1),
        "batch": batch,
        "batch_with_outcomes": with_outcomes,
        "latency": latency,
        "ratios": {
            "ingest_http_vs_copy_ratio": batch["ratio"],
            f"ingest_p99_ms_at_{at50['clients']}": at50["p99_ms"],
            f"ingest_p50_ms_at_{at50['clients']}": at50["p50_ms"],
        },
        "targets": {
            "ingest_http_vs_copy_ratio": {"target": ">= 0.25", "met": batch["ratio"] >= 0.25},
            "ingest_p99_ms_at_50": {"target": "< 20", "met": at50["p99_ms"] < 20},
        },
    }
    write_json(out / "ingest.json", result)
    plot(result, out / "ingest.png")
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    agg_backend()
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    batch = result["batch"]
    a.bar(["HTTP /v1/traces", "COPY"], [batch["http_rows_per_s"], batch["copy_rows_per_s"]],
          color=["tab:blue", "tab:gray"])
    a.set_ylabel("rows/s (median of batches)")
    a.set_title(f"{batch['batch_size']}-trace batches: ratio {batch['ratio']:.2f} (target ≥0.25)")
    lat = result["latency"]
    xs = [lv["clients"] for lv in lat]
    b.plot(xs, [lv["p50_ms"] for lv in lat], "o-", label="p50")
    b.plot(xs, [lv["p99_ms"] for lv in lat], "s-", label="p99")
    b.axhline(20, color="tab:red", ls="--", lw=1, label="p99 target at 50")
    b.set_xscale("log")
    b.set_xticks(xs, [str(x) for x in xs])
    b.set_xlabel("concurrent clients (closed loop)")
    b.set_ylabel("single-trace POST latency, ms")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batches", type=int, default=IngestConfig.batches)
    p.add_argument("--batch-size", type=int, default=IngestConfig.batch_size)
    p.add_argument("--outcome-batches", type=int, default=IngestConfig.outcome_batches)
    p.add_argument("--requests", type=int, default=IngestConfig.requests_per_level)
    p.add_argument("--clients", type=str, default="1,10,50")
    p.add_argument("--workers", type=int, default=IngestConfig.server_workers)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", type=str, default=None)
    a = p.parse_args(argv)
    cfg = IngestConfig(
        batch_size=a.batch_size, batches=a.batches, outcome_batches=a.outcome_batches,
        clients=tuple(int(x) for x in a.clients.split(",")), requests_per_level=a.requests,
        server_workers=a.workers, profile=a.profile,
    )
    result = run(cfg, a.out)
    for lv in result["latency"]:
        print(f"latency c={lv['clients']:>3}: p50 {lv['p50_ms']} ms  p99 {lv['p99_ms']} ms  "
              f"{lv['requests_per_s']} req/s  errors {lv['errors']}")
    b = result["batch"]
    print(f"batch: HTTP {b['http_rows_per_s']} rows/s, COPY {b['copy_rows_per_s']} rows/s")
    print_ratios("ingest", result["ratios"])
    return result


if __name__ == "__main__":
    main()
