"""Adapter files under faults: a writer killed with SIGKILL, a file changed after training, a disk
that fills up mid-write. A reader (vLLM, the local backend, promotion) must only ever see complete,
verified adapters; a partial one is never visible under an adapter's name."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from app.db import utcnow
from app.models import Job, JobKind, JobStatus
from tests.conftest import skip_or_fail
from workers.learner.adapters import (
    MANIFEST,
    WEIGHTS,
    AdapterIntegrityError,
    load_verified,
    write_adapter,
)

from ._support import PrivateRedis
from .conftest import fault_settings, use_settings

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]

# A writer that spends most of its time inside save_weights, so a random SIGKILL almost always
# lands mid-write (the case that matters), between adapters otherwise.
WRITER = textwrap.dedent('''
    import os, sys, time
    from pathlib import Path
    from workers.learner.adapters import write_adapter

    root, prefix = Path(sys.argv[1]), sys.argv[2]
    chunk = os.urandom(64 * 1024)

    def slow_save(d):
        with open(d / "adapter_model.safetensors", "wb") as f:
            for _ in range(24):
                f.write(chunk)
                f.flush()
                time.sleep(0.01)
        (d / "adapter_config.json").write_text("{}")

    for i in range(10_000):
        write_adapter(slow_save, root / f"{prefix}-{i:04d}", base_model_digest="b", parent=None,
                      group_ids=[str(i)], config={}, metrics={})
        print(i, flush=True)
''')


def visible_adapters(root: Path) -> list[Path]:
    """What a reader lists: directories whose names do not start with a dot."""
    return sorted(p for p in root.iterdir() if not p.name.startswith("."))


def hidden_leftovers(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.name.startswith("."))


def fake_save(size: int, content: bytes | None = None) -> Callable[[Path], None]:
    def save(d: Path) -> None:
        (d / WEIGHTS).write_bytes(content if content is not None else os.urandom(size))
        (d / "adapter_config.json").write_text("{}")

    return save


def write(path: Path, save: Callable[[Path], None]) -> dict[str, object]:
    return write_adapter(save, path, base_model_digest="b", parent=None, group_ids=["g"],
                         config={}, metrics={})


# ----------------------------------------------------------------------------- kill -9


def test_sigkill_mid_write_never_leaves_a_partial_adapter_visible(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    root.mkdir()
    rng = random.Random(8)
    killed_mid_write = 0
    for round_ in range(4):
        before = set(hidden_leftovers(root))
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), f"r{round_}"], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.6, 1.4))
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        # Every adapter a reader can see is complete and verifies.
        for adapter in visible_adapters(root):
            manifest = load_verified(adapter)
            assert manifest["weights_sha256"]
        leftovers = set(hidden_leftovers(root)) - before
        killed_mid_write += len(leftovers)
        assert all(".tmp-" in p.name for p in leftovers)
    assert len(visible_adapters(root)) >= 4, "the writer never finished an adapter"
    assert killed_mid_write >= 1, "no kill landed mid-write: the test proved nothing"


WORKER = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    from app.jobs.service import run_job
    from workers.learner.adapters import write_adapter

    job_id, out = int(sys.argv[1]), Path(sys.argv[2])

    def slow_save(d):
        with open(d / "adapter_model.safetensors", "wb") as f:
            for _ in range(600):  # about 30 s: it is killed long before
                f.write(b"w" * 4096)
                f.flush()
                time.sleep(0.05)
        (d / "adapter_config.json").write_text("{}")

    def handler(ctx):
        write_adapter(slow_save, out, base_model_digest="b", parent=None, group_ids=["g"],
                      config={}, metrics={})
        return {"adapter": str(out)}

    print(run_job(job_id, handler, lease_s=2.0), flush=True)
''')


def test_training_worker_killed_mid_run_is_reaped_and_retried_without_partial_adapters(
    fresh_database: str, private_redis: PrivateRedis, tmp_path: Path, restore_settings: None
) -> None:
    from app.jobs.service import enqueue, reap, run_job
    from workers.celery_app import app

    private_redis.start()
    app.amqp._producer_pool = None  # see test_redis_down: get_celery keeps a stale pool
    settings = fault_settings(fresh_database, tmp_path / "data", task_always_eager=False,
                              broker_url=private_redis.url)
    database = use_settings(settings)
    out = settings.adapters_dir / "p" / "run-1"
    out.parent.mkdir(parents=True)
    with database.session() as s:
        job_id = enqueue(s, JobKind.train, f"train:test={uuid.uuid4().hex}", {"run_id": 1},
                         dispatch=False).id
    env = {**os.environ, "TRACELEARN_DATABASE_URL": fresh_database,
           "TRACELEARN_DATA_DIR": str(tmp_path / "data"), "TRACELEARN_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(job_id), str(out)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not hidden_leftovers(out.parent):  # the worker is writing its adapter
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "worker never started writing"
            time.sleep(0.05)
        time.sleep(0.3)
        with database.session() as s:
            job = s.get(Job, job_id)
            assert job is not None and job.status is JobStatus.running and job.attempts == 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert visible_adapters(out.parent) == [], "a partial adapter became visible"

    # The lease runs out; the reaper (beat, every reaper_interval_s) re-queues the job.
    assert reap(now=utcnow()).requeued == []  # the lease is still live: nothing to reap yet
    result = reap(now=utcnow() + timedelta(seconds=5))
    assert result.requeued == [job_id] and result.redispatched == 1  # a worker would get it
    with database.session() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status is JobStatus.retrying
        assert "lease expired" in (job.error or "")

    # The next delivery runs the job to completion: one complete adapter, verified.
    def handler(ctx: object) -> dict[str, str]:
        write(out, fake_save(4096))
        return {"adapter": str(out)}

    assert run_job(job_id, handler, lease_s=5.0) == "succeeded"
    with database.session() as s:
        job = s.scalars(select(Job).where(Job.id == job_id)).one()
        assert job.status is JobStatus.succeeded and job.attempts == 2
    assert visible_adapters(out.parent) == [out]
    assert load_verified(out)["weights_sha256"]
    # A duplicate delivery of the old message does nothing.
    assert run_job(job_id, handler) == "skipped"


# ----------------------------------------------------------------------------- tampering


@pytest.mark.parametrize(
    "tamper",
    ["flip-a-byte", "truncate", "append", "replace-weights", "edit-manifest-sha",
     "delete-manifest", "delete-weights", "manifest-not-json"],
)
def test_an_adapter_changed_on_disk_is_refused(tmp_path: Path, tamper: str) -> None:
    adapter = tmp_path / "a"
    write(adapter, fake_save(0, b"\x01" * 4096))
    weights, manifest = adapter / WEIGHTS, adapter / MANIFEST
    assert load_verified(adapter)
    data = bytearray(weights.read_bytes())
    if tamper == "flip-a-byte":
        data[2048] ^= 0x01
        weights.write_bytes(bytes(data))
    elif tamper == "truncate":
        weights.write_bytes(bytes(data[:100]))
    elif tamper == "append":
        weights.write_bytes(bytes(data) + b"\x00")
    elif tamper == "replace-weights":
        weights.write_bytes(os.urandom(len(data)))
    elif tamper == "edit-manifest-sha":
        manifest.write_text(manifest.read_text().replace('"weights_sha256": "',
                                                         '"weights_sha256": "0'))
    elif tamper == "delete-manifest":
        manifest.unlink()
    elif tamper == "delete-weights":
        weights.unlink()
    elif tamper == "manifest-not-json":
        manifest.write_text("{not json")
    with pytest.raises((AdapterIntegrityError, ValueError)):
        load_verified(adapter)


# ----------------------------------------------------------------------------- disk full


@pytest.fixture
def tiny_disk() -> Iterator[Path]:
    """A 1 MiB tmpfs (root only). Without the privilege the RLIMIT_FSIZE test covers the case."""
    mount = Path(tempfile.mkdtemp(prefix="tl-full-"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        shutil.rmtree(mount, ignore_errors=True)
        skip_or_fail(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
        shutil.rmtree(mount, ignore_errors=True)


def test_disk_full_mid_write_fails_cleanly_and_leaves_no_directory(tiny_disk: Path) -> None:
    root = tiny_disk / "adapters"
    write(root / "fits", fake_save(600 * 1024))
    with pytest.raises(OSError) as excinfo:
        write(root / "too-big", fake_save(600 * 1024))
    assert excinfo.value.errno == 28  # ENOSPC
    assert visible_adapters(root) == [root / "fits"]
    assert hidden_leftovers(root) == [], "the temp dir of the failed write was left behind"
    assert load_verified(root / "fits")
    # Space freed: the same name can now be written (nothing half-made squats on it).
    shutil.rmtree(root / "fits")
    write(root / "too-big", fake_save(600 * 1024))
    assert load_verified(root / "too-big")


FSIZE_WRITER = textwrap.dedent('''
    import resource, signal, sys
    from pathlib import Path
    from workers.learner.adapters import write_adapter

    # Files may not grow past 256 KiB; ignore SIGXFSZ so the write fails with EFBIG instead.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    def save(d):
        (d / "adapter_model.safetensors").write_bytes(b"x" * (1024 * 1024))

    try:
        write_adapter(save, Path(sys.argv[1]), base_model_digest="b", parent=None,
                      group_ids=[], config={}, metrics={})
    except OSError as exc:
        print("errno", exc.errno)
        sys.exit(3)
''')


def test_file_size_limit_mid_write_fails_cleanly_without_privileges(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    root.mkdir()
    done = subprocess.run([sys.executable, "-c", FSIZE_WRITER, str(root / "a")], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert "errno 27" in done.stdout  # EFBIG
    assert list(root.iterdir()) == [], "a partial adapter or temp dir was left behind"
