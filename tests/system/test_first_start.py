"""A first `tracelearn up` on a fresh data directory takes the bundled model shipped in the
package: no build, `/healthz` within seconds, and its log (a pipe, not a terminal) says so."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.system.test_up_lifecycle import start_up, wait_healthy
from workers.learner import bundled

# The bar on this 2-core machine, measured from the command to the first 200.
FIRST_HEALTHZ_S = 30.0


def test_first_up_serves_the_shipped_model_without_building(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, cache = tmp_path / "data", tmp_path / "model-cache"
    env = {"TRACELEARN_DATA_DIR": str(data), "TRACELEARN_MODEL_CACHE": str(cache),
           "TRACELEARN_RATE_LIMIT_PER_MINUTE": "0"}
    monkeypatch.delenv("TRACELEARN_BASE_MODEL_DIR", raising=False)
    port, log = free_port(), tmp_path / "up.log"
    t0 = time.monotonic()
    proc = start_up(env, port, log)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, log)
        elapsed = time.monotonic() - t0
        text = log.read_text()
        assert elapsed <= FIRST_HEALTHZ_S, (elapsed, text)
        assert "building" not in text
        assert f"model     {data / 'models' / 'tiny'}" in text
        assert bundled.file_digests(data / "models" / "tiny") == bundled.read_manifest()["files"]
        assert not cache.exists()  # nothing was built, so nothing was cached
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
