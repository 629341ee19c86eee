"""`tracelearn api` picks its process count from the cores it may use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from app.cli.serve import MAX_DEFAULT_API_WORKERS, default_api_workers


def _default_with_affinity(cpus: set[int]) -> int:
    code = (f"import os; os.sched_setaffinity(0, {cpus!r}); "
            "from app.cli.serve import default_api_workers; print(default_api_workers())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=os.environ | {"PYTHONPATH": os.getcwd()})
    return int(out.stdout)


def test_the_default_never_exceeds_the_cores_this_process_may_use_nor_the_cap() -> None:
    assert 1 <= default_api_workers() <= min(len(os.sched_getaffinity(0)),
                                             MAX_DEFAULT_API_WORKERS)


def test_a_process_pinned_to_one_core_defaults_to_one_worker() -> None:
    assert _default_with_affinity({min(os.sched_getaffinity(0))}) == 1


def test_a_served_app_freezes_its_startup_heap_and_a_plain_app_does_not(tmp_path: Path) -> None:
    """``tracelearn api`` and ``up`` build the app with ``create_served_app``: what exists at
    startup leaves the cyclic collector's walk (a full collection over it stalled requests for
    ~90 ms). ``create_app``, which tests build by the hundred, freezes nothing."""
    code = ("import gc; from app.main import create_app, create_served_app; create_app(); "
            "before = gc.get_freeze_count(); create_served_app(); "
            "print(before, gc.get_freeze_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=os.environ | {"PYTHONPATH": os.getcwd(),
                                                       "TRACELEARN_DATA_DIR": str(tmp_path)})
    before, after = map(int, out.stdout.split())
    assert before == 0
    assert after > 50_000
