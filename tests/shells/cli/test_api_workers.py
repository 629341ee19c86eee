"""`tracelearn api` picks its process count from the cores it may use."""

from __future__ import annotations

import os
import subprocess
import sys

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
