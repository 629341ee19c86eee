"""Single-trace ingest under ``wrk``: requests/s and latency percentiles against connections.

    python -m benchmarks.ingest_wrk [--duration 10] [--connections 1,10,50]

``tracelearn api`` (one process, the CLI as production starts it) on a scratch Postgres database,
rate limit off. ``wrk`` (a C client, so the load generator is not the bottleneck; ``apt-get
install wrk``) runs a closed loop at each connection count for ``--duration`` seconds, POSTing
one trace per request with a unique ``external_id`` built by its Lua script from a per-thread
counter (``ingest_wrk.lua``). Reported per level: requests/s, p50/p75/p90/p99 and max from
``wrk --latency``, non-2xx responses and socket errors, and the rows counted in the database
afterwards against the 2xx answers (sent = stored, up to the requests still in flight when wrk
stopped: answered by the server, not counted by wrk).

Baselines in the same run: ``GET /healthz`` at the same connection counts, the floor of this
stack (uvicorn, middleware, no database); the code path before the caches and the one-statement
ingest cannot be run from this tree, so the issue's figures (issue 14, measured the same way on
the same machine) are plotted as the reference, not remeasured. The machine is shared: the load
average is recorded at start and end, and absolute numbers move with it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg

from benchmarks._common import (
    agg_backend,
    machine,
    print_ratios,
    results_dir,
    stop_process,
    write_json,
)
from benchmarks._common import wait_healthy as _wait_healthy
from benchmarks.ingest import PG_ADMIN_DSN, create_database, drop_database, setup

LUA = Path(__file__).resolve().with_name("ingest_wrk.lua")
REPO = Path(__file__).resolve().parents[1]
# Issue 14: wrk, Postgres, one `tracelearn api` process, rate limit off, before this change.
ISSUE_REFERENCE: dict[int, dict[str, float | None]] = {
    1: {"requests_per_s": 167, "p50_ms": 5.6, "p99_ms": 16},
    10: {"requests_per_s": 129, "p50_ms": None, "p99_ms": 177},
    50: {"requests_per_s": 120, "p50_ms": 397, "p99_ms": 715},
}
_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if m is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return round(float(m.group(1)) * _UNIT_MS[m.group(2)], 3)


def parse_wrk(out: str) -> dict[str, Any]:
    """The figures of one ``wrk --latency`` run from its text report."""
    result: dict[str, Any] = {}
    # wrk pads durations of whole seconds ("1.04s ") with a trailing space.
    for pct, value in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", out, re.M):
        result[f"p{pct}_ms"] = _ms(value)
    lat = re.search(r"^\s+Latency\s+(\S+)\s+(\S+)\s+(\S+)", out, re.M)
    if lat:
        result["mean_ms"], result["max_ms"] = _ms(lat.group(1)), _ms(lat.group(3))
    total = re.search(r"^\s+(\d+) requests in ([\d.]+)(\w+),", out, re.M)
    if total:
        result["requests"] = int(total.group(1))
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    result["requests_per_s"] = float(rps.group(1)) if rps else 0.0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["non_2xx"] = int(non2xx.group(1)) if non2xx else 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    result["socket_errors"] = sum(int(x) for x in sock.groups()) if sock else 0
    return result


def run_wrk(url: str, connections: int, duration_s: int, env: dict[str, str],
            script: Path | None) -> dict[str, Any]:
    threads = min(connections, 2)  # two cores: more wrk threads would only compete
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration_s}s",
           "--timeout", "10s", "--latency"]
    if script is not None:
        cmd += ["-s", str(script)]
    out = subprocess.run([*cmd, url], env=os.environ | env, capture_output=True, text=True,
                         check=True, timeout=duration_s + 60).stdout
    level = {"connections": connections, **parse_wrk(out)}
    if not level.get("requests"):
        level["wrk_output"] = out[-2000:]  # a level that measured nothing says why
    return level


def _stored(database_url: str, tenant: str, run_id: str) -> int:
    dsn = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM traces WHERE tenant = %s AND external_id LIKE %s",
                           (tenant, f"{run_id}-%")).fetchone()
    return int(row[0]) if row else 0


def run(connections: list[int], duration_s: int, out_dir: str | Path | None) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    info = machine()
    name = create_database()
    database_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    data_dir = Path(tempfile.mkdtemp(prefix="tl-wrk-"))
    key, tenant = setup(database_url, data_dir)
    policy = f"wrk-{uuid.uuid4().hex[:8]}"
    env = os.environ | {
        "TRACELEARN_DATABASE_URL": database_url, "TRACELEARN_DATA_DIR": str(data_dir),
        "TRACELEARN_RATE_LIMIT_PER_MINUTE": "0", "TRACELEARN_LOG_LEVEL": "WARNING",
    }
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = data_dir / "api.log"
    ingest: list[dict[str, Any]] = []
    healthz: list[dict[str, Any]] = []
    try:
        with log.open("w") as log_file:
            proc = subprocess.Popen([sys.executable, "-m", "app.cli", "api", "--port", str(port),
                                     "--workers", "1"],
                                    cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(url, proc, log, timeout_s=120)
            headers = {"Authorization": f"Bearer {key}"}
            created = httpx.post(f"{url}/v1/policies", json={"name": policy}, headers=headers,
                                 timeout=30)
            created.raise_for_status()
            for c in connections:
                run_id = f"r{c}-{uuid.uuid4().hex[:6]}"
                lua_env = {"WRK_KEY": key, "WRK_POLICY": policy, "WRK_RUN": run_id}
                run_wrk(f"{url}/v1/traces", c, 2, lua_env | {"WRK_RUN": f"warm{run_id}"}, LUA)
                level = run_wrk(f"{url}/v1/traces", c, duration_s, lua_env, LUA)
                level["rows_stored"] = _stored(database_url, tenant, run_id)
                # wrk counts answered requests; the ones in flight when it stops (at most one
                # per connection) are stored too but not counted.
                unanswered = level["rows_stored"] - (level.get("requests", 0) - level["non_2xx"])
                level["stored_minus_answered"] = unanswered
                level["sent_equals_stored"] = 0 <= unanswered <= c
                ingest.append(level)
                healthz.append(run_wrk(f"{url}/healthz", c, duration_s, {}, None))
                print(f"c={c:>3}: ingest {level['requests_per_s']:.0f} req/s p50 "
                      f"{level.get('p50_ms')} ms p99 {level.get('p99_ms')} ms | healthz "
                      f"{healthz[-1]['requests_per_s']:.0f} req/s", flush=True)
        finally:
            stop_process(proc)
    finally:
        drop_database(name)
        shutil.rmtree(data_dir, ignore_errors=True)
    by_c = {lv["connections"]: lv for lv in ingest}
    lo, hi = min(by_c), max(by_c)
    ratios: dict[str, Any] = {
        f"ingest_rps_at_{hi}_vs_{lo}": round(by_c[hi]["requests_per_s"]
                                             / max(by_c[lo]["requests_per_s"], 1e-9), 3),
        f"ingest_p99_ms_at_{hi}": by_c[hi].get("p99_ms"),
    }
    if hi in ISSUE_REFERENCE:
        reference_rps = ISSUE_REFERENCE[hi]["requests_per_s"] or 1.0
        ratios[f"ingest_rps_at_{hi}_vs_issue_reference"] = round(
            by_c[hi]["requests_per_s"] / reference_rps, 3)
    result = {
        "machine": info | {"loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "config": {"connections": connections, "duration_s": duration_s,
                   "server": "tracelearn api, 1 process, Postgres, rate limit off",
                   "admin_dsn": PG_ADMIN_DSN},
        "ingest": ingest,
        "healthz_floor": healthz,
        "issue_reference": {str(k): v for k, v in ISSUE_REFERENCE.items()},
        "ratios": ratios,
    }
    out = results_dir(out_dir)
    write_json(out / "ingest_wrk.json", result)
    plot(result, out / "ingest_wrk.png")
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def plot(result: dict[str, Any], path: Path) -> None:
    agg_backend()
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [lv["connections"] for lv in result["ingest"]]
    ref = {int(k): v for k, v in result["issue_reference"].items()}
    a.plot(xs, [lv["requests_per_s"] for lv in result["ingest"]], "o-", label="POST /v1/traces")
    a.plot(xs, [lv["requests_per_s"] for lv in result["healthz_floor"]], "^--", color="tab:gray",
           label="GET /healthz (floor)")
    a.plot(sorted(ref), [ref[c]["requests_per_s"] for c in sorted(ref)], "x:", color="tab:red",
           label="issue 14 reference")
    a.set_ylabel("requests/s")
    b.plot(xs, [lv.get("p50_ms") for lv in result["ingest"]], "o-", label="ingest p50")
    b.plot(xs, [lv.get("p99_ms") for lv in result["ingest"]], "s-", label="ingest p99")
    b.plot(xs, [lv.get("p99_ms") for lv in result["healthz_floor"]], "^--", color="tab:gray",
           label="healthz p99")
    b.plot(sorted(ref), [ref[c]["p99_ms"] for c in sorted(ref)], "x:", color="tab:red",
           label="issue 14 p99")
    b.axhline(20, color="tab:red", ls="--", lw=0.8, label="p99 target at 50")
    b.set_yscale("log")
    b.set_ylabel("latency, ms")
    load = result["machine"]["loadavg_at_start"]
    for ax in (a, b):
        ax.set_xscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("wrk connections (closed loop)")
        ax.legend(fontsize=8)
    fig.suptitle(f"single-trace ingest under wrk, {result['config']['duration_s']} s per point "
                 f"(load average at start {load[0]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=int, default=10, help="seconds per connection count")
    p.add_argument("--connections", type=str, default="1,10,50")
    p.add_argument("--out", type=str, default=None)
    a = p.parse_args(argv)
    started = time.monotonic()
    result = run([int(c) for c in a.connections.split(",")], a.duration, a.out)
    print(f"load average {result['machine']['loadavg_at_start']} at start, "
          f"{result['machine']['loadavg_at_end']} at end; {time.monotonic() - started:.0f} s")
    print_ratios("ingest_wrk", result["ratios"])
    return result


if __name__ == "__main__":
    main()
