"""`tracelearn up` owns its process tree: TERM, INT and HUP each stop the API and every worker
(no orphan), an acknowledged trace is kept, and a second `up` on a taken port or data directory
refuses before printing anything else."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, func, select

from app.cli.serve import CannotStart, run_embedded
from app.models import Trace
from app.settings import Settings, get_settings
from benchmarks._common import wait_healthy
from tests.conftest import REPO, free_port
from tests.support.seeding import build_model
from workers.clinical import task
from workers.learner import allocator


@pytest.fixture
def up_env(tmp_path: Path) -> dict[str, str]:
    return {"TRACELEARN_DATA_DIR": str(tmp_path / "data"),
            "TRACELEARN_BASE_MODEL_DIR": str(build_model(get_settings().model_cache)),
            "TRACELEARN_RATE_LIMIT_PER_MINUTE": "0"}


def start_up(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "app.cli", "up", "--port", str(port)],
                                cwd=REPO, env=os.environ | env, stdout=out,
                                stderr=subprocess.STDOUT)


def children(pid: int) -> list[int]:
    """Every live process whose parent chain reaches ``pid`` (read from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, parent in parents.items() if parent == p]
        found += kids
        frontier += kids
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_stops_the_whole_tree_and_keeps_acknowledged_traces(
    up_env: dict[str, str], tmp_path: Path, sig: signal.Signals
) -> None:
    port, log = free_port(), tmp_path / "up.log"
    proc = start_up(up_env, port, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        key = subprocess.run(
            [sys.executable, "-m", "app.cli", "keys", "create", "--tenant", "t",
             "--scopes", "ingest,read,admin"], cwd=REPO, env=os.environ | up_env,
            capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        headers = {"Authorization": f"Bearer {key}"}
        assert httpx.post(f"{url}/v1/policies", json={"name": "clinical"},
                          headers=headers).status_code == 201
        item = task.ingest_items(1, 1, "train", policy="clinical")[0]
        assert httpx.post(f"{url}/v1/traces", json=item, headers=headers).status_code == 201
        tree = children(proc.pid)
        assert len(tree) >= 3, tree  # the train worker, the other queues' worker, beat
        proc.send_signal(sig)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"up did not stop within 60 s of {sig.name}:\n{log.read_text()}")
        assert code in (0, 128 + sig, -sig), log.read_text()
        deadline = time.monotonic() + 10
        while any(alive(c) for c in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [c for c in tree if alive(c)] == [], log.read_text()
        assert "tracelearn stopped" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    engine = create_engine(f"sqlite:///{Path(up_env['TRACELEARN_DATA_DIR']) / 'tracelearn.db'}")
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Trace)) == 1
    engine.dispose()


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_a_taken_port_is_refused_before_the_banner(
    up_env: dict[str, str], busy_port: int
) -> None:
    out = subprocess.run([sys.executable, "-m", "app.cli", "up", "--port", str(busy_port)],
                         cwd=REPO, env=os.environ | up_env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    text = out.stdout + out.stderr
    assert f"port {busy_port} on 127.0.0.1 is already in use" in text
    assert "tracelearn is up" not in text


def test_a_data_dir_in_use_is_refused(up_env: dict[str, str], tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "up.log"
    first = start_up(up_env, port, log)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", first, log)
        out = subprocess.run([sys.executable, "-m", "app.cli", "up", "--port", str(free_port())],
                             cwd=REPO, env=os.environ | up_env, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 2
        assert "is in use by tracelearn up (pid" in out.stdout + out.stderr
        assert "tracelearn is up" not in out.stdout + out.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)


def test_a_required_allocator_that_is_not_installed_is_refused_before_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(allocator, "_JEMALLOC_GLOBS", ("/nonexistent/libjemalloc.so.2",))
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: None)
    settings = Settings(data_dir=tmp_path / "data", learner_allocator="jemalloc")
    with pytest.raises(CannotStart, match="apt-get install libjemalloc2"):
        run_embedded(settings, "127.0.0.1", free_port())
    assert not (tmp_path / "data").exists()  # no lock, no database, no model copied
