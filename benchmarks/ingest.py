"""Trace ingest into Postgres: single traces under ``wrk``, and batches over HTTP against ``COPY``
of the same rows, in one run.

    python -m benchmarks.ingest [--duration 10] [--connections 1,10,50,200] [--repeats 3]
                                [--batch-sizes 1,10,100,1000] [--batches 6] [--profile]

One ``tracelearn api`` process (the CLI as production starts it) on a scratch Postgres database,
rate limit off; the machine's load average is recorded at start and end, since the absolute
numbers move with it.

1. **Single traces under wrk.** ``wrk`` (a C client, so the load generator is not the bottleneck;
   installed with ``apt-get install wrk`` when missing and this runs as root) runs a closed loop
   at each connection count for ``--duration`` seconds, after a short unrecorded warm-up, POSTing
   one trace per request with a unique ``external_id`` built by its Lua script from a run id, the
   wrk thread and a counter (``ingest_wrk.lua``). Reported per level: requests/s, traces/s (2xx
   answers per second), p50/p75/p90/p99 and max from ``wrk --latency``, non-2xx responses and
   socket errors, and the rows counted in the database afterwards against the 2xx answers (sent =
   stored, up to the requests still in flight when wrk stopped: answered by the server, not
   counted by wrk). The reference level (``--profile-at``, 50) runs ``--repeats`` times (3) back
   to back and reports the run with the median p99, every run's figures beside it: on this
   shared 2-core host one run's p99 moves by half between runs of the same build, and one
   sample of a tail is a poor figure. Baseline at the same connection counts: ``GET
   /healthz``, the floor of this stack (uvicorn, middleware, no database). The code path
   before the caches and the one-statement ingest cannot be run from this tree, so the issue's
   figures (issue 14, measured the same way on the same machine) are plotted as the
   reference, not remeasured.
2. **Batches against COPY.** For each batch size, batches of clinical traces (deterministic:
   ``workers.clinical.task.ingest_items(seed=0)``) are POSTed to ``/v1/traces`` one after another.
   After each HTTP batch, the very rows it stored are read back and written again with psycopg
   ``COPY … FROM STDIN`` into the same ``traces`` table (under another tenant, so nothing
   conflicts), in its own transaction. The two alternate, so the table grows the same way under
   both. Reported per batch size: rows/s of each (median over batches) and their ratio. Inline
   outcomes are left out of these items (COPY would not write them); a second, smaller pass of
   1000-trace batches with outcomes attached reports HTTP traces+outcomes against COPY into both
   tables.

``--profile`` samples the server process with py-spy (all threads) during one more pass of
1000-trace batches and one more wrk run at ``--profile-at`` connections (50), and writes the top
frames to ``results/ingest_profile_batch.txt`` and ``results/ingest_profile_wrk50.txt``. The
profiled passes' figures are kept apart (``batch_profiled``, ``wrk_profiled``): the profiler
takes CPU from the server. The ratios are printed last: ``ingest_http_vs_copy_ratio`` (1000-trace
batches), ``ingest_p99_ms_at_50`` and ``ingest_rps_at_50_vs_1`` (throughput at 50 connections
over throughput at one: under load it should not fall).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import psycopg

from app.cli.serve import default_api_workers
from benchmarks._common import (
    agg_backend,
    machine,
    median,
    print_ratios,
    python_loop_ms,
    results_dir,
    stop_process,
    wait_healthy,
    write_json,
)

PG_ADMIN_DSN = os.environ.get(
    "TRACELEARN_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
POLICY = "clinical-pfs"
REPO = Path(__file__).resolve().parents[1]
LUA = Path(__file__).resolve().with_name("ingest_wrk.lua")
TRACE_COLUMNS = (
    "tenant", "external_id", "policy_id", "messages", "response", "model", "snapshot_id",
    "metadata", "split", "redactions", "content_hash", "occurred_at", "created_at",
)
OUTCOME_COLUMNS = (
    "tenant", "trace_external_id", "trace_id", "name", "value", "source", "created_at",
    "updated_at", "origin", "labelled_at",
)
HEADLINE_BATCH_SIZE = 1000
"""``ingest_http_vs_copy_ratio`` is the ratio at this batch size (the API's default limit), or at
the largest one run when it is not; the outcomes pass and the profiled pass use it too."""
# Issue 14: wrk, Postgres, one `tracelearn api` process, rate limit off, before the caches and
# the one-statement ingest.
ISSUE_REFERENCE: dict[int, dict[str, float | None]] = {
    1: {"requests_per_s": 167, "p50_ms": 5.6, "p99_ms": 16},
    10: {"requests_per_s": 129, "p50_ms": None, "p99_ms": 177},
    50: {"requests_per_s": 120, "p50_ms": 397, "p99_ms": 715},
}


@dataclass(frozen=True)
class IngestConfig:
    connections: tuple[int, ...] = (1, 10, 50, 200)
    """wrk connection counts (closed loop, one request in flight per connection)."""
    duration_s: int = 10
    """Measured seconds per connection count (and again for the ``/healthz`` floor)."""
    warmup_s: int = 2
    """Unrecorded wrk seconds before each measured level."""
    healthz_floor: bool = True
    """Also run ``GET /healthz`` at every connection count."""
    reference_connections: int = 50
    """The level the summary figures are taken at (the largest one when it is not run)."""
    reference_repeats: int = 3
    """Measured runs at the reference level, back to back: its figures are those of the run
    with the median p99, and every run is reported (``repeats``). On a shared 2-core host one
    run's tail moves by half between runs of the same build."""
    batch_sizes: tuple[int, ...] = (1, 10, 100, 1000)
    """Traces per HTTP request in the COPY comparison."""
    batches: int = 6
    """Measured batches per batch size (plus one warm-up batch each, not counted)..."""
    min_rows: int = 100
    """...but at least this many measured rows per batch size (so 100 one-trace batches)."""
    outcome_batches: int = 2
    """Batches of the secondary pass with inline outcomes (1000 traces each; 0 skips it)."""
    server_workers: int = 1
    """``tracelearn api`` processes."""
    default_processes_level: bool = True
    """Also run the reference level against a server with the processes ``tracelearn api``
    starts by default on this host (``default_api_workers``), when that is more than
    ``server_workers``: the service as deployed here, beside the issue's one-process table."""
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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``tracelearn api`` in a subprocess, configured by environment, output to ``log``."""

    def __init__(self, database_url: str, data_dir: Path, workers: int = 1) -> None:
        self.port = _free_port()
        self.env = os.environ | {
            "TRACELEARN_DATABASE_URL": database_url,
            "TRACELEARN_DATA_DIR": str(data_dir),
            "TRACELEARN_RATE_LIMIT_PER_MINUTE": "0",  # the load generator is one key
            "TRACELEARN_LOG_LEVEL": "WARNING",
        }
        self.cmd = [sys.executable, "-m", "app.cli", "api", "--port", str(self.port),
                    "--workers", str(workers)]
        self.log = data_dir / "api.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        with self.log.open("w") as log_file:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=log_file,
                                         stderr=subprocess.STDOUT)
        wait_healthy(self.url, self.proc, self.log, timeout_s=120)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGINT)


class Profiler:
    """py-spy sampling every thread of the server process (``--profile``).

    Non-blocking at 100 Hz: py-spy's default, pausing the server for every sample at 250 Hz,
    cut wrk at 50 connections from ~115 to 25 req/s on two loaded cores (non-blocking at 250 Hz:
    82), so a profiled run's figures are not the measured ones (see ``run_wrk_levels``)."""

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
                [str(spy), "record", "--pid", str(self.pid), "--format", "raw", "--rate", "100",
                 "--subprocesses", "--nonblocking", "--output", str(self.raw)],
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


def top_self_frames(summary: str, n: int) -> list[str]:
    """The first ``n`` lines of the "top self" section of a ``summarise_collapsed`` text."""
    lines = summary.splitlines()
    start = lines.index("top self:") + 1 if "top self:" in lines else len(lines)
    return lines[start : start + n]


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


# ------------------------------------------------------------------ phase 1: single traces under wrk

_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if m is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return round(float(m.group(1)) * _UNIT_MS[m.group(2)], 3)


def parse_wrk(out: str) -> dict[str, Any]:
    """The figures of one ``wrk --latency`` run from its text report; ``traces_per_s`` counts
    the 2xx answers only (one trace per request)."""
    result: dict[str, Any] = {}
    # wrk pads durations of whole seconds ("1.04s ") with a trailing space.
    for pct, value in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", out, re.M):
        result[f"p{pct}_ms"] = _ms(value)
    lat = re.search(r"^\s+Latency\s+(\S+)\s+(\S+)\s+(\S+)", out, re.M)
    if lat:
        result["mean_ms"], result["max_ms"] = _ms(lat.group(1)), _ms(lat.group(3))
    total = re.search(r"^\s+(\d+) requests in ([\d.]+(?:us|ms|s|m)),", out, re.M)
    if total:
        result["requests"] = int(total.group(1))
        result["seconds"] = round(_ms(total.group(2)) / 1000, 3)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    result["requests_per_s"] = float(rps.group(1)) if rps else 0.0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["non_2xx"] = int(non2xx.group(1)) if non2xx else 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    result["socket_errors"] = sum(int(x) for x in sock.groups()) if sock else 0
    if result.get("seconds"):
        answered = result["requests"] - result["non_2xx"]
        result["traces_per_s"] = round(answered / result["seconds"], 1)
    return result


def reference_level(connections: Sequence[int], at: int) -> int:
    """The connection count the summary figures are taken at: ``at``, or the largest one run."""
    return at if at in connections else max(connections)


def wrk_ratios(levels: Sequence[dict[str, Any]], at: int) -> dict[str, float | None]:
    """The summary figures of the wrk phase: p50/p99 at the reference level and its requests/s
    over those at the smallest level."""
    by_c = {lv["connections"]: lv for lv in levels}
    hi = reference_level(list(by_c), at)
    lo = min(by_c)
    ratios: dict[str, float | None] = {
        f"ingest_p99_ms_at_{hi}": by_c[hi].get("p99_ms"),
        f"ingest_p50_ms_at_{hi}": by_c[hi].get("p50_ms"),
        f"ingest_rps_at_{hi}_vs_{lo}": round(
            by_c[hi]["requests_per_s"] / max(by_c[lo]["requests_per_s"], 1e-9), 3),
    }
    reference_rps = ISSUE_REFERENCE.get(hi, {}).get("requests_per_s")
    if reference_rps:
        ratios[f"ingest_rps_at_{hi}_vs_issue_reference"] = round(
            by_c[hi]["requests_per_s"] / reference_rps, 3)
    return ratios


def ensure_wrk() -> str:
    """The ``wrk`` binary; installed with apt-get when missing and this process may."""
    found = shutil.which("wrk")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk is missing: apt-get install wrk", flush=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=False,
                       stdout=subprocess.DEVNULL, env=os.environ | {"DEBIAN_FRONTEND":
                                                                    "noninteractive"})
        found = shutil.which("wrk")
    if found is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    return found


def run_wrk(wrk: str, url: str, connections: int, duration_s: int, env: dict[str, str],
            script: Path | None) -> dict[str, Any]:
    threads = min(connections, 2)  # two cores: more wrk threads would only compete
    cmd = [wrk, "-t", str(threads), "-c", str(connections), "-d", f"{duration_s}s",
           "--timeout", "10s", "--latency"]
    if script is not None:
        cmd += ["-s", str(script)]
    out = subprocess.run([*cmd, url], env=os.environ | env, capture_output=True, text=True,
                         check=True, timeout=duration_s + 60).stdout
    level = {"connections": connections, **parse_wrk(out)}
    if not level.get("requests"):
        level["wrk_output"] = out[-2000:]  # a level that measured nothing says why
    return level


class CpuMeter:
    """CPU seconds spent by the API process (with its children) and by the Postgres server
    processes while a block runs. Throughput moves with whatever else the host runs; CPU per
    request moves far less, so back-to-back comparisons of two builds read it first."""

    def __init__(self, api_pid: int) -> None:
        self.api_pid = api_pid
        self.api_s = self.postgres_s = 0.0

    @staticmethod
    def _cpu(proc: psutil.Process, reaped: bool = False) -> float:
        """``proc``'s CPU seconds; ``reaped``: with its children that have ended."""
        try:
            times = proc.cpu_times()
        except psutil.Error:  # gone meanwhile: a backend that ended
            return 0.0
        own = times.user + times.system
        return float(own + times.children_user + times.children_system if reaped else own)

    def _read(self) -> tuple[float, float]:
        api = psutil.Process(self.api_pid)
        api_s = self._cpu(api, reaped=True) + sum(
            self._cpu(c, reaped=True) for c in api.children(recursive=True))
        postgres_s = sum(self._cpu(p) for p in psutil.process_iter(["name"])
                         if (p.info.get("name") or "").startswith("postgres"))
        return api_s, postgres_s

    def __enter__(self) -> CpuMeter:
        self._start = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        api_s, postgres_s = self._read()
        self.api_s, self.postgres_s = api_s - self._start[0], postgres_s - self._start[1]

    def per_request(self, requests: int) -> dict[str, float | None]:
        """Milliseconds of CPU per answered request, each side."""
        if requests <= 0:
            return {"api_cpu_ms_per_request": None, "postgres_cpu_ms_per_request": None}
        return {"api_cpu_ms_per_request": round(1000 * self.api_s / requests, 4),
                "postgres_cpu_ms_per_request": round(1000 * self.postgres_s / requests, 4)}


def _stored(pg_dsn: str, tenant: str, run_id: str) -> int:
    """Rows of one wrk run once the count stops moving: the last answers' commits may land a
    moment after wrk has stopped (the commit runs after the response is sent)."""
    last, settled_at = -1, time.monotonic()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT count(*) FROM traces WHERE tenant = %s AND external_id LIKE %s",
                (tenant, f"{run_id}-%")).fetchone()
            n = int(row[0]) if row else 0
            if n == last or time.monotonic() - settled_at > 10:
                return n
            last = n
            time.sleep(0.3)


_REPEAT_FIELDS = ("requests_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms",
                  "api_cpu_ms_per_request", "sent_equals_stored")


def median_run(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median p99 (the upper one of an even count; a run without a p99
    counts as the worst), with every run's figures under ``repeats`` when there are several."""
    ranked = sorted(runs, key=lambda run: run.get("p99_ms") or float("inf"))
    chosen = dict(ranked[len(ranked) // 2])
    if len(runs) > 1:
        chosen["repeats"] = [{k: run.get(k) for k in _REPEAT_FIELDS} for run in runs]
    return chosen


def _measured(server: Server, wrk: str, c: int, duration_s: int, lua_env: dict[str, str],
              pg_dsn: str, tenant: str) -> dict[str, Any]:
    """One measured wrk run of single-trace POSTs: wrk's figures, the CPU each request cost,
    and the rows it stored against the requests answered."""
    assert server.proc is not None
    with CpuMeter(server.proc.pid) as cpu:
        level = run_wrk(wrk, f"{server.url}/v1/traces", c, duration_s, lua_env, LUA)
    level |= cpu.per_request(int(level.get("requests", 0)))
    level["rows_stored"] = _stored(pg_dsn, tenant, lua_env["WRK_RUN"])
    # wrk counts answered requests; the ones in flight when it stops (at most one per
    # connection) are stored too but not counted.
    unanswered = level["rows_stored"] - (level.get("requests", 0) - level["non_2xx"])
    level["stored_minus_answered"] = unanswered
    level["sent_equals_stored"] = 0 <= unanswered <= c
    return level


def run_wrk_levels(
    server: Server, key: str, tenant: str, pg_dsn: str, cfg: IngestConfig, out: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any] | None]:
    """Each connection count: warm-up, the measured ingest run, the rows stored, then the
    ``/healthz`` floor. Under ``--profile``, the reference level runs once more with py-spy
    attached: the profiler takes CPU from the server on this machine, so that run's figures are
    kept apart (returned third) and the table's are unprofiled."""
    wrk = ensure_wrk()
    policy = f"wrk-{uuid.uuid4().hex[:8]}"
    httpx.post(f"{server.url}/v1/policies", json={"name": policy},
               headers={"Authorization": f"Bearer {key}"}, timeout=30).raise_for_status()
    assert server.proc is not None
    ingest: list[dict[str, Any]] = []
    healthz: list[dict[str, Any]] = []
    profiled: dict[str, Any] | None = None
    profile_at = reference_level(cfg.connections, cfg.reference_connections)
    for c in cfg.connections:
        run_id = f"r{c}-{uuid.uuid4().hex[:6]}"
        lua_env = {"WRK_KEY": key, "WRK_POLICY": policy, "WRK_RUN": run_id}
        if cfg.warmup_s:
            run_wrk(wrk, f"{server.url}/v1/traces", c, cfg.warmup_s,
                    lua_env | {"WRK_RUN": f"warm{run_id}"}, LUA)
        repeats = max(1, cfg.reference_repeats) if c == profile_at else 1
        runs = [_measured(server, wrk, c, cfg.duration_s,
                          lua_env | {"WRK_RUN": f"{run_id}-{n}"}, pg_dsn, tenant)
                for n in range(repeats)]
        level = median_run(runs)
        ingest.append(level)
        line = (f"wrk c={c:>3}: ingest {level['requests_per_s']:.0f} req/s p50 "
                f"{level.get('p50_ms')} ms p99 {level.get('p99_ms')} ms, {level['non_2xx']} "
                f"non-2xx, {level['socket_errors']} socket errors, {level['rows_stored']} stored, "
                f"CPU ms a request: API {level['api_cpu_ms_per_request']}, Postgres "
                f"{level['postgres_cpu_ms_per_request']}")
        if "repeats" in level:
            line += (f" (the median p99 of {len(runs)} runs: "
                     + " / ".join(f"{run.get('p99_ms')}" for run in runs) + " ms)")
        if cfg.profile and c == profile_at:
            profile = out / f"ingest_profile_wrk{c}.txt"
            with Profiler(server.proc.pid, profile, enabled=True):
                profiled = run_wrk(wrk, f"{server.url}/v1/traces", c, cfg.duration_s,
                                   lua_env | {"WRK_RUN": f"prof{run_id}"}, LUA)
            profiled["profile"] = profile.name
            line += f" | under py-spy {profiled['requests_per_s']:.0f} req/s"
        if cfg.healthz_floor:
            with CpuMeter(server.proc.pid) as cpu:
                floor = run_wrk(wrk, f"{server.url}/healthz", c, cfg.duration_s, {}, None)
            healthz.append(floor | cpu.per_request(int(floor.get("requests", 0))))
            line += (f" | healthz {healthz[-1]['requests_per_s']:.0f} req/s p99 "
                     f"{healthz[-1].get('p99_ms')} ms, API CPU ms a request "
                     f"{healthz[-1]['api_cpu_ms_per_request']}")
        print(line, flush=True)
    return ingest, healthz, profiled


# ------------------------------------------------------------------ phase 2: batches against COPY


def batch_summary(size: int, http_s: Sequence[float], copy_s: Sequence[float]) -> dict[str, Any]:
    """Rows/s of each path (median over batches of ``size`` rows) and HTTP over COPY; the
    per-pair ratios show the spread on a noisy machine."""
    http_rps = median([size / s for s in http_s])
    copy_rps = median([size / s for s in copy_s])
    return {
        "batch_size": size,
        "batches": len(http_s),
        "http_seconds": [round(s, 4) for s in http_s],
        "copy_seconds": [round(s, 4) for s in copy_s],
        "http_rows_per_s": round(http_rps, 1),
        "copy_rows_per_s": round(copy_rps, 1),
        "ratio": round(http_rps / copy_rps, 4),
        "pair_ratios": [round(c / h, 4) for h, c in zip(http_s, copy_s, strict=True)],
    }


def run_batches(
    server_url: str, key: str, tenant: str, pg_dsn: str, cfg: IngestConfig, size: int,
    n_batches: int, outcomes: bool, tag: str = "",
) -> dict[str, Any]:
    tag = f"{tag}{'o' if outcomes else 'b'}{size}"
    items = make_items(cfg.seed, size * (n_batches + 1), tag, outcomes)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    http_s: list[float] = []
    copy_s: list[float] = []
    body_bytes = 0
    with httpx.Client(base_url=server_url, timeout=120) as client, \
            psycopg.connect(pg_dsn, autocommit=True) as conn:
        for b in range(n_batches + 1):
            chunk = items[b * size : (b + 1) * size]
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
            # Read at once, not polled: the 207 follows the commit that holds the rows (the
            # session dependency's function scope), so a row missing here is a lost trace.
            rows = _stored_rows(conn, tenant, ext)
            outs = _stored_outcomes(conn, tenant, ext) if outcomes else []
            if len(rows) != len(chunk):
                raise RuntimeError(f"batch {b}: {len(rows)} rows committed when the 207 came "
                                   f"for {len(chunk)}")
            dc = copy_rows(conn, rows, outs, f"copy-{tag}")
            if b > 0:  # the first batch warms both paths up
                http_s.append(dt)
                copy_s.append(dc)
    return batch_summary(size, http_s, copy_s) | {
        "inline_outcomes": outcomes, "request_body_bytes": body_bytes}


def headline_batch_size(cfg: IngestConfig) -> int:
    return HEADLINE_BATCH_SIZE if HEADLINE_BATCH_SIZE in cfg.batch_sizes else max(cfg.batch_sizes)


def batches_for(size: int, cfg: IngestConfig) -> int:
    """Measured batches at ``size``: ``cfg.batches``, more for small batches (``cfg.min_rows``)."""
    return max(cfg.batches, -(-cfg.min_rows // size))


# ------------------------------------------------------------------ the whole benchmark


def run(cfg: IngestConfig, out_dir: str | Path | None = None) -> dict[str, Any]:
    started_on = machine()
    out = results_dir(out_dir)
    ensure_wrk()  # before minutes of batches, not after
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
                batches = [
                    run_batches(server.url, key, tenant, pg_dsn, cfg, size,
                                batches_for(size, cfg), outcomes=False)
                    for size in cfg.batch_sizes
                ]
                # The profile from a pass of its own: py-spy takes CPU from the server.
                batch_profiled = None
                if cfg.profile:
                    with Profiler(server.proc.pid, out / "ingest_profile_batch.txt", True):
                        batch_profiled = run_batches(server.url, key, tenant, pg_dsn, cfg,
                                                     headline_batch_size(cfg), cfg.batches,
                                                     outcomes=False, tag="p")
                with_outcomes = (
                    run_batches(server.url, key, tenant, pg_dsn, cfg, headline_batch_size(cfg),
                                cfg.outcome_batches, outcomes=True)
                    if cfg.outcome_batches
                    else None
                )
                for bt in batches:
                    print(f"batch {bt['batch_size']:>4}: HTTP {bt['http_rows_per_s']} rows/s, "
                          f"COPY {bt['copy_rows_per_s']} rows/s, ratio {bt['ratio']}",
                          flush=True)
                wrk, healthz, profiled = run_wrk_levels(server, key, tenant, pg_dsn, cfg, out)
            default_processes: dict[str, Any] | None = None
            processes = default_api_workers()
            if cfg.default_processes_level and processes > cfg.server_workers:
                with Server(db_url, Path(tmp), processes) as server:
                    level, floor, _ = run_wrk_levels(
                        server, key, tenant, pg_dsn, replace(cfg, connections=(
                            reference_level(cfg.connections, cfg.reference_connections),),
                            profile=False), out)
                    default_processes = {"processes": processes, "wrk": level,
                                         "healthz_floor": floor}
    finally:
        drop_database(name)
    by_size = {bt["batch_size"]: bt for bt in batches}
    headline = by_size[headline_batch_size(cfg)]
    ratios: dict[str, Any] = {
        "ingest_http_vs_copy_ratio": headline["ratio"],
        **{f"ingest_http_vs_copy_ratio_batch_{s}": bt["ratio"] for s, bt in by_size.items()},
        **wrk_ratios(wrk, cfg.reference_connections),
    }
    if default_processes is not None:
        level = default_processes["wrk"][0]
        at = level["connections"]
        ratios[f"ingest_p99_ms_at_{at}_default_processes"] = level.get("p99_ms")
        ratios[f"ingest_rps_at_{at}_default_processes"] = level.get("requests_per_s")
    at, lo = reference_level(cfg.connections, cfg.reference_connections), min(cfg.connections)
    p99, rps_ratio = ratios[f"ingest_p99_ms_at_{at}"], ratios[f"ingest_rps_at_{at}_vs_{lo}"]
    result: dict[str, Any] = {
        "benchmark": "ingest",
        "config": asdict(cfg) | {
            "server": f"tracelearn api, {cfg.server_workers} process, Postgres, rate limit off"},
        "machine": started_on | {"loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
                                 "python_loop_ms_at_end": python_loop_ms()},
        "seconds": round(time.perf_counter() - t0, 1),
        "batches": batches,
        "batch": headline,
        "batch_with_outcomes": with_outcomes,
        "batch_profiled": batch_profiled,
        "wrk": wrk,
        "healthz_floor": healthz,
        "wrk_profiled": profiled,
        "wrk_default_processes": default_processes,
        "issue_reference": {str(k): v for k, v in ISSUE_REFERENCE.items()},
        "ratios": ratios,
        "targets": {
            "ingest_http_vs_copy_ratio": {"target": ">= 0.25", "met": headline["ratio"] >= 0.25},
            f"ingest_p99_ms_at_{at}": {"target": "< 20", "met": p99 is not None and p99 < 20},
            f"ingest_rps_at_{at}_vs_{lo}": {"target": ">= 1.0", "met": rps_ratio >= 1.0},
        },
    }
    write_json(out / "ingest.json", result)
    plot(result, out / "ingest.png")
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    agg_backend()
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    wrk, floor = result["wrk"], result["healthz_floor"]
    xs = [lv["connections"] for lv in wrk]
    ref = {int(k): v for k, v in result["issue_reference"].items()}
    a.plot(xs, [lv["requests_per_s"] for lv in wrk], "o-", label="POST /v1/traces")
    b.plot(xs, [lv.get("p99_ms") for lv in wrk], "s-", label="ingest p99")
    b.plot(xs, [lv.get("p50_ms") for lv in wrk], "o-", alpha=0.6, label="ingest p50")
    if floor:
        a.plot(xs, [lv["requests_per_s"] for lv in floor], "^--", color="tab:gray",
               label="GET /healthz (floor)")
        b.plot(xs, [lv.get("p99_ms") for lv in floor], "^--", color="tab:gray",
               label="healthz p99")
    a.plot(sorted(ref), [ref[k]["requests_per_s"] for k in sorted(ref)], "x:", color="tab:red",
           label="issue 14 reference")
    b.plot(sorted(ref), [ref[k]["p99_ms"] for k in sorted(ref)], "x:", color="tab:red",
           label="issue 14 p99")
    b.axhline(20, color="tab:red", ls="--", lw=0.8, label="p99 target at 50")
    a.set_ylabel("requests/s")
    a.set_title(f"wrk, {result['config']['duration_s']} s per point")
    b.set_yscale("log")
    b.set_ylabel("latency, ms")
    b.set_title("single-trace POST latency")
    for ax in (a, b):
        ax.set_xscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("wrk connections (closed loop)")
        ax.legend(fontsize=8)
    sizes = [bt["batch_size"] for bt in result["batches"]]
    c.plot(sizes, [bt["ratio"] for bt in result["batches"]], "o-", label="HTTP / COPY rows/s")
    c.axhline(0.25, color="tab:red", ls="--", lw=0.8, label="target at 1000 (≥ 0.25)")
    c.set_xscale("log")
    c.set_xticks(sizes, [str(s) for s in sizes])
    c.set_xlabel("traces per batch")
    c.set_ylabel("ratio")
    c.set_title("batch ingest over HTTP vs COPY")
    c.legend(fontsize=8)
    load = result["machine"]["loadavg_at_start"]
    fig.suptitle(f"ingest into Postgres, one tracelearn api process (load average at start "
                 f"{load[0]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    d = IngestConfig()
    p.add_argument("--connections", type=str, default=",".join(map(str, d.connections)))
    p.add_argument("--duration", type=int, default=d.duration_s, help="seconds per level")
    p.add_argument("--warmup", type=int, default=d.warmup_s, help="unrecorded seconds per level")
    p.add_argument("--no-healthz", action="store_true", help="skip the /healthz floor")
    p.add_argument("--profile-at", type=int, default=d.reference_connections,
                   help="connections of the profiled wrk level, and of the summary figures")
    p.add_argument("--repeats", type=int, default=d.reference_repeats,
                   help="measured runs at the reference level (its figures: the median p99's)")
    p.add_argument("--batch-sizes", type=str, default=",".join(map(str, d.batch_sizes)))
    p.add_argument("--batches", type=int, default=d.batches)
    p.add_argument("--min-rows", type=int, default=d.min_rows)
    p.add_argument("--outcome-batches", type=int, default=d.outcome_batches)
    p.add_argument("--workers", type=int, default=d.server_workers)
    p.add_argument("--no-default-processes", action="store_true",
                   help="skip the reference level against the default number of API processes")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", type=str, default=None)
    a = p.parse_args(argv)
    for flag, value in (("--connections", a.connections), ("--batch-sizes", a.batch_sizes)):
        if not _ints(value) or min(_ints(value)) < 1:
            p.error(f"{flag} needs at least one positive number (comma-separated), got {value!r}")
    cfg = IngestConfig(
        connections=_ints(a.connections), duration_s=a.duration, warmup_s=a.warmup,
        healthz_floor=not a.no_healthz, reference_connections=a.profile_at,
        reference_repeats=a.repeats,
        batch_sizes=_ints(a.batch_sizes), batches=a.batches, min_rows=a.min_rows,
        outcome_batches=a.outcome_batches, server_workers=a.workers, profile=a.profile,
        default_processes_level=not a.no_default_processes,
    )
    result = run(cfg, a.out)
    at = reference_level(cfg.connections, cfg.reference_connections)
    prof = results_dir(a.out) / f"ingest_profile_wrk{at}.txt"
    if cfg.profile and prof.is_file():
        print(f"server profile during wrk at {at} connections "
              f"(top self frames; {prof}):")
        print("\n".join(top_self_frames(prof.read_text(), 12)))
    m = result["machine"]
    print(f"load average {m['loadavg_at_start']} at start, {m['loadavg_at_end']} at end; "
          f"{result['seconds']} s")
    print_ratios("ingest", result["ratios"])
    return result


if __name__ == "__main__":
    main()
