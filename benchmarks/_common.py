"""Small helpers shared by the benchmark scripts: results folder, JSON output, timing stats."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from workers.learner.recipe import BootstrapConfig

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def results_dir(out: str | Path | None = None) -> Path:
    path = Path(out) if out is not None else RESULTS_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The processor's name (hosts differ between sessions, and so do bf16 and AVX-512)."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return platform.processor() or None
    return next((line.split(":", 1)[1].strip() for line in lines
                 if line.startswith("model name")), None)


def python_loop_ms() -> float:
    """Milliseconds this host takes for a fixed pure-Python loop (the best of three): how fast
    the host ran around a measurement. On a shared VM it moves by a third or more within an
    hour, and the absolute figures with it."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i
        best = min(best, time.perf_counter() - start)
    return round(best * 1000, 1)


def machine() -> dict[str, Any]:
    """What the numbers were measured on (ratios are the point; absolutes need this context)."""
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in load],
        "python_loop_ms_at_start": python_loop_ms(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not values:
        return float("nan")
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(float(x))


def print_ratios(name: str, ratios: dict[str, Any]) -> None:
    """Every benchmark ends by printing its headline ratios, last."""
    print(f"== {name}")
    for k, v in ratios.items():
        print(f"{k} = {v}")


def agg_backend() -> None:
    import matplotlib

    matplotlib.use("Agg")


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path | None = None,
                 timeout_s: float = 120.0) -> float:
    """Seconds until ``url``/healthz answers 200. Raises when ``proc`` exits first or
    ``timeout_s`` passes, with the end of ``log`` (the process's output) in the message."""
    def tail() -> str:
        return log.read_text()[-4000:] if log is not None and log.exists() else ""

    t0 = time.monotonic()
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return time.monotonic() - t0
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before answering "
                               f"/healthz:\n{tail()}")
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{url}/healthz did not answer within {timeout_s:g} s:\n{tail()}")
        time.sleep(0.1)


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace_s: float = 15.0
                 ) -> None:
    """Ask ``proc`` to stop with ``sig``; kill it when it has not exited after ``grace_s``."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


BOOTSTRAP_FLAG_HELP = (
    "KEY=VALUE, repeatable: a field of the warm-start recipe (BootstrapConfig) other than size, "
    "e.g. answer_line_weight=5; every value left out keeps the shipped recipe's")


def add_bootstrap_flag(ap: argparse.ArgumentParser) -> None:
    """The repeatable ``--bootstrap KEY=VALUE`` flag (read back by ``bootstrap_flag_overrides``)."""
    ap.add_argument("--bootstrap", action="append", default=[], metavar="KEY=VALUE",
                    help=BOOTSTRAP_FLAG_HELP)


def bootstrap_flag_overrides(
    ap: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[tuple[str, Any], ...]:
    """``bootstrap_overrides`` of the parsed ``--bootstrap`` and ``--size`` flags; a bad one
    stops the command with its reason, as argparse stops on a bad flag."""
    try:
        return bootstrap_overrides(args.bootstrap, args.size)
    except ValueError as exc:
        ap.error(str(exc))


def bootstrap_overrides(pairs: Sequence[str], size: str = "tiny") -> tuple[tuple[str, Any], ...]:
    """``--bootstrap KEY=VALUE`` flags as typed ``BootstrapConfig`` overrides.

    Each value is converted to its field's type (int, float or str) and the whole recipe is
    validated, so a typo or an out-of-range value stops the run before anything is built.
    Raises ``ValueError`` with the reason.
    """
    kinds = {f.name: f.type for f in dataclasses.fields(BootstrapConfig) if f.name != "size"}
    convert = {"int": int, "float": float, "str": str}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not raw.strip():
            raise ValueError(f"--bootstrap {pair!r}: expected KEY=VALUE")
        if key not in kinds:
            raise ValueError(f"--bootstrap {pair!r}: unknown field {key!r}; "
                             f"choose from {sorted(kinds)} (the size has its own flag)")
        if key in out:
            raise ValueError(f"--bootstrap {key!r} given twice")
        try:
            out[key] = convert[str(kinds[key])](raw.strip())
        except ValueError:
            raise ValueError(f"--bootstrap {pair!r}: {raw.strip()!r} is not a {kinds[key]}") from None
    BootstrapConfig(size=size, **out)  # validates the ranges
    return tuple(sorted(out.items()))
