"""The unattended loop over a long stretch, as an operator runs it: `tracelearn up` on the embedded
default (SQLite, no-server broker, the bundled tiny model), one policy retraining on a schedule,
synthetic clinical traces posted throughout with a fifth of their outcomes arriving a batch later
through /v1/feedback, and nobody at the console.

    python -m benchmarks.unattended [--minutes 25] [--schedule "*/3 * * * *"] [--min-groups 8]

Records every round's verdict, failed jobs, ingest latency split by whether a training run or an
evaluation was in progress, and the resident memory of each process of `up` over time. Writes
``benchmarks/results/unattended.json`` and ``unattended.png`` (memory per process and ingest
latency over time, rounds shaded). ``tests/system/test_unattended_loop.py`` drives the same
traffic for its 3- and 6-minute soak tests.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from app.models import Job, JobKind, JobStatus, Policy, Snapshot, TrainingRun
from benchmarks._common import machine, percentile, results_dir, wait_healthy, write_json
from workers.clinical import task

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Traffic:
    """Posts a batch of ``batch`` traces every ``every_s`` seconds and sends the withheld outcomes
    (every fifth) one batch later, timing each request."""

    url: str
    key: str
    policy: str
    every_s: float = 2.0
    batch: int = 5
    latencies: list[float] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)
    """``time.time()`` of each request in ``latencies``."""
    errors: list[str] = field(default_factory=list)
    posted: int = 0
    late_outcomes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        withheld: list[dict[str, object]] = []
        seed = 0
        with httpx.Client(base_url=self.url, headers=headers, timeout=60) as client:
            while not self._stop.is_set():
                seed += 1
                items = task.ingest_items(seed, self.batch, "train", policy=self.policy)
                late = []
                for i, item in enumerate(items):
                    if i % 5 == 4:  # a fifth of the outcomes come later
                        outcome = item.pop("outcome")
                        assert isinstance(outcome, dict)
                        late.append({"trace_external_id": item["external_id"],
                                     "name": outcome["name"], "value": outcome["value"]})
                self._timed(client, "/v1/traces", {"traces": items})
                self.posted += len(items)
                if withheld:
                    self._timed(client, "/v1/feedback", {"outcomes": withheld})
                    self.late_outcomes += len(withheld)
                withheld = late
                self._stop.wait(self.every_s)

    def _timed(self, client: httpx.Client, path: str, body: dict[str, object]) -> None:
        sent = time.time()
        t0 = time.perf_counter()
        try:
            r = client.post(path, json=body)
        except httpx.TransportError as exc:
            self.errors.append(f"{path}: {exc!r}")
            return
        self.latencies.append(time.perf_counter() - t0)
        self.sent_at.append(sent)
        if r.status_code not in (200, 201, 207):
            self.errors.append(f"{path}: {r.status_code} {r.text[:200]}")

    def p(self, q: float) -> float:
        values = sorted(self.latencies)
        return values[min(len(values) - 1, int(q * len(values)))]

    def stop(self) -> None:
        self._stop.set()


def process_role(proc: psutil.Process, root_pid: int) -> str:
    """A name an operator recognises for one process of `tracelearn up`."""
    if proc.pid == root_pid:
        return "api + up"
    cmd = proc.cmdline()
    if "beat" in cmd:
        return "beat"
    if "--queues" in cmd:
        queues = cmd[cmd.index("--queues") + 1]
        return f"worker ({queues.replace(',maintenance', '')})"
    return " ".join(cmd[1:4])


@dataclass
class MemorySampler:
    """Resident memory of `up` and each of its descendants, and the jobs in progress, every
    ``every_s`` seconds."""

    root_pid: int
    database_url: str
    every_s: float = 5.0
    samples: list[dict[str, Any]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        engine = create_engine(self.database_url)
        root = psutil.Process(self.root_pid)
        while not self._stop.is_set():
            rss: dict[str, float] = {}
            try:
                for proc in [root, *root.children(recursive=True)]:
                    role = process_role(proc, self.root_pid)
                    rss[role] = rss.get(role, 0.0) + proc.memory_info().rss / 2**20
            except psutil.Error:
                pass
            with Session(engine) as s:
                running = {kind.value: n for kind, n in s.execute(
                    select(Job.kind, func.count()).where(Job.status == JobStatus.running)
                    .group_by(Job.kind)).all()}
            self.samples.append({"t": time.time(), "rss_mib": rss, "running": running})
            self._stop.wait(self.every_s)
        engine.dispose()

    def busy(self, t: float) -> bool:
        """Whether a training run or an evaluation was in progress at ``t`` (nearest sample)."""
        if not self.samples:
            return False
        near = min(self.samples, key=lambda s: abs(s["t"] - t))
        return bool(near["running"].get(JobKind.train.value) or near["running"].get(JobKind.eval.value))

    def stop(self) -> None:
        self._stop.set()


def cli(env: dict[str, str], *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=REPO, env=os.environ | env,
                         capture_output=True, text=True, timeout=300, check=True)
    return out.stdout


def iso(t: datetime | None) -> str | None:
    return None if t is None else t.replace(tzinfo=t.tzinfo or UTC).isoformat()


def summarise(traffic: Traffic, sampler: MemorySampler, database_url: str, policy: str,
              t_start: float) -> dict[str, Any]:
    engine = create_engine(database_url)
    with Session(engine) as s:
        policy_id = s.scalars(select(Policy.id).where(Policy.name == policy)).one()
        rounds = [{"name": c.served_name, "status": c.status.value, "reason": c.status_reason,
                   "created_at": iso(c.created_at)}
                  for c in s.scalars(select(Snapshot).where(Snapshot.policy_id == policy_id,
                                                            Snapshot.version > 0)
                                     .order_by(Snapshot.version))]
        runs = [{"id": r.id, "status": r.status.value, "started_at": iso(r.started_at),
                 "finished_at": iso(r.finished_at), "groups": len(r.trace_ids),
                 "optimizer_steps": (r.metrics.get("summary") or {}).get("optimizer_steps"),
                 "seconds": (r.metrics.get("summary") or {}).get("seconds")}
                for r in s.scalars(select(TrainingRun).order_by(TrainingRun.id))]
        jobs = {status.value: n for status, n in s.execute(
            select(Job.status, func.count()).group_by(Job.status)).all()}
        failed = [{"key": j.key, "error": (j.error or "")[:300]}
                  for j in s.scalars(select(Job).where(Job.status == JobStatus.failed))]
    engine.dispose()
    busy = [lat for lat, t in zip(traffic.latencies, traffic.sent_at, strict=True) if sampler.busy(t)]
    idle = [lat for lat, t in zip(traffic.latencies, traffic.sent_at, strict=True)
            if not sampler.busy(t)]
    roles = sorted({r for s in sampler.samples for r in s["rss_mib"]})
    memory = {role: {"start_mib": next((s["rss_mib"][role] for s in sampler.samples
                                         if role in s["rss_mib"]), None),
                     "end_mib": next((s["rss_mib"][role] for s in reversed(sampler.samples)
                                      if role in s["rss_mib"]), None),
                     "max_mib": max(s["rss_mib"].get(role, 0.0) for s in sampler.samples)}
              for role in roles}

    def ms(xs: list[float], q: float) -> float:
        return round(1000 * percentile(xs, q), 1)

    return {
        "rounds": rounds, "runs": runs, "failed_jobs": failed,
        "jobs_by_status": jobs,
        "verdicts": sum(r["status"] not in ("candidate", "evaluated") for r in rounds),
        "traces_posted": traffic.posted, "late_outcomes": traffic.late_outcomes,
        "requests": len(traffic.latencies), "request_errors": traffic.errors[:20],
        "ingest_ms": {
            "all": {"n": len(traffic.latencies), "p50": ms(traffic.latencies, 50),
                    "p99": ms(traffic.latencies, 99), "max": ms(traffic.latencies, 100)},
            "during_train_or_eval": {"n": len(busy), "p50": ms(busy, 50), "p99": ms(busy, 99),
                                     "max": ms(busy, 100)},
            "otherwise": {"n": len(idle), "p50": ms(idle, 50), "p99": ms(idle, 99),
                          "max": ms(idle, 100)},
        },
        "memory_mib": memory,
        "samples": [{"t": round(s["t"] - t_start, 1), **{k: v for k, v in s.items() if k != "t"}}
                    for s in sampler.samples],
    }


def plot(result: dict[str, Any], traffic: Traffic, t_start: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    fig, (ax_mem, ax_lat) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for role in sorted(result["memory_mib"]):
        ax_mem.plot([s["t"] / 60 for s in samples],
                    [s["rss_mib"].get(role, float("nan")) for s in samples], label=role)
    ax_mem.set_ylabel("resident memory (MiB)")
    ax_mem.legend(loc="upper left", fontsize=8)
    ax_mem.set_title(f"tracelearn up, unattended {result['minutes']:g} min: "
                     f"{len(result['rounds'])} rounds, {result['verdicts']} verdicts, "
                     f"{len(result['failed_jobs'])} failed jobs")
    ax_lat.scatter([(t - t_start) / 60 for t in traffic.sent_at],
                   [1000 * lat for lat in traffic.latencies], s=4)
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("ingest request latency (ms)")
    ax_lat.set_xlabel("minutes since start (shaded: a training run or evaluation in progress)")
    busy_t = [s["t"] / 60 for s in samples
              if s["running"].get("train") or s["running"].get("eval")]
    for ax in (ax_mem, ax_lat):
        for t in busy_t:
            ax.axvspan(t - 2.5 / 60, t + 2.5 / 60, color="tab:orange", alpha=0.15, lw=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=25.0)
    ap.add_argument("--schedule", default="*/3 * * * *")
    ap.add_argument("--min-groups", type=int, default=8)
    ap.add_argument("--every-s", type=float, default=2.0, help="seconds between batches")
    ap.add_argument("--batch", type=int, default=5, help="traces per batch")
    ap.add_argument("--settle-minutes", type=float, default=6.0,
                    help="after the traffic stops, time given to rounds still on their way")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="default: a fresh temporary directory")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="tl-unattended-"))
    env = {"TRACELEARN_DATA_DIR": str(data_dir), "TRACELEARN_LOG_LEVEL": "INFO",
           "TRACELEARN_RATE_LIMIT_PER_MINUTE": "0"}
    database_url = f"sqlite:///{data_dir / 'tracelearn.db'}"
    port = 18000 + os.getpid() % 1000
    url = f"http://127.0.0.1:{port}"
    log = data_dir / "up.log"
    data_dir.mkdir(parents=True, exist_ok=True)

    at_start = machine()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "up", "--port", str(port)],
                                cwd=REPO, env=os.environ | env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        healthy_s = wait_healthy(url, proc, log, timeout_s=900)
        print(f"up answered /healthz after {healthy_s:.1f} s ({data_dir})", flush=True)
        key = cli(env, "keys", "create", "--tenant", "ops",
                  "--scopes", "ingest,read,admin").strip().splitlines()[-1]
        policy = "clinical"
        r = httpx.post(f"{url}/v1/policies", headers={"Authorization": f"Bearer {key}"},
                       json={"name": policy, "schedule": args.schedule,
                             "training": {"min_groups": args.min_groups}}, timeout=30)
        r.raise_for_status()
        traffic = Traffic(url, key, policy, every_s=args.every_s, batch=args.batch)
        sampler = MemorySampler(proc.pid, database_url)
        threads = [threading.Thread(target=traffic.run, daemon=True),
                   threading.Thread(target=sampler.run, daemon=True)]
        for th in threads:
            th.start()
        t_traffic = time.time()
        while time.time() - t_traffic < args.minutes * 60:
            time.sleep(30)
            print(f"{(time.time() - t_traffic) / 60:5.1f} min: {traffic.posted} traces, "
                  f"ingest p50 {1000 * traffic.p(0.5):.0f} ms p99 {1000 * traffic.p(0.99):.0f} ms, "
                  f"rss {sampler.samples[-1]['rss_mib'] if sampler.samples else {}}", flush=True)
        traffic.stop()
        settle_end = time.time() + args.settle_minutes * 60
        engine = create_engine(database_url)
        while time.time() < settle_end:
            with Session(engine) as s:
                pending = s.scalar(select(func.count()).select_from(Snapshot).where(
                    Snapshot.version > 0, Snapshot.status.in_(("candidate", "evaluated"))))
            if not pending:
                break
            time.sleep(5)
        engine.dispose()
        sampler.stop()
        for th in threads:
            th.join(timeout=60)
        result = summarise(traffic, sampler, database_url, policy, t_traffic) | {
            "minutes": args.minutes, "schedule": args.schedule, "min_groups": args.min_groups,
            "traces_per_s": args.batch / args.every_s, "healthz_after_s": round(healthy_s, 1),
            "machine": at_start, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
    out_dir = results_dir(args.out)
    write_json(out_dir / "unattended.json", result)
    plot(result, traffic, t_traffic, out_dir / "unattended.png")
    print({k: result[k] for k in ("verdicts", "traces_posted", "ingest_ms", "memory_mib")})
    print(f"rounds: {[(r['name'], r['status']) for r in result['rounds']]}")
    print(f"failed jobs: {result['failed_jobs']}")


if __name__ == "__main__":
    main()
