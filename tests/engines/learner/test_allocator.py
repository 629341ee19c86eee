"""The learner's allocator: the environment that preloads jemalloc, and what a process got."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from workers.learner import allocator
from workers.learner.allocator import (
    JEMALLOC_CONF,
    AllocatorUnavailable,
    allocator_in_use,
    find_jemalloc,
    learner_environment,
    planned_allocator,
)

REPO = Path(__file__).resolve().parents[3]


def _jemalloc() -> Path:
    lib = find_jemalloc()
    assert lib is not None, "libjemalloc.so.2 is not installed (apt-get install libjemalloc2)"
    return lib


def test_jemalloc_is_preloaded_first_with_decay_off_and_other_preloads_kept() -> None:
    lib = _jemalloc()
    env = learner_environment({"PATH": "/bin", "LD_PRELOAD": "/opt/a.so:/opt/b.so"}, "auto")
    assert env["LD_PRELOAD"] == f"{lib} /opt/a.so /opt/b.so"
    assert env["MALLOC_CONF"] == JEMALLOC_CONF == "dirty_decay_ms:-1,muzzy_decay_ms:-1"
    assert env["PATH"] == "/bin"
    # Applied twice (a worker's env handed on to its ranks): jemalloc is named once.
    assert learner_environment(env, "jemalloc") == env


def test_an_operators_own_malloc_conf_is_kept() -> None:
    env = learner_environment({"MALLOC_CONF": "narenas:2"}, "jemalloc")
    assert env["MALLOC_CONF"] == "narenas:2"
    assert env["LD_PRELOAD"] == str(_jemalloc())


def test_system_leaves_the_environment_as_given() -> None:
    base = {"LD_PRELOAD": "/opt/a.so", "HOME": "/root"}
    assert learner_environment(base, "system") == base


def test_without_the_library_auto_falls_back_and_jemalloc_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(allocator, "_JEMALLOC_GLOBS", ("/nonexistent/libjemalloc.so.2",))
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: None)
    assert find_jemalloc() is None
    assert learner_environment({"HOME": "/root"}, "auto") == {"HOME": "/root"}
    assert planned_allocator("auto") == planned_allocator("system") == "system"
    with pytest.raises(AllocatorUnavailable, match="apt-get install libjemalloc2"):
        learner_environment({}, "jemalloc")
    with pytest.raises(AllocatorUnavailable, match="apt-get install libjemalloc2"):
        planned_allocator("jemalloc")


def test_the_planned_allocator_is_what_the_environment_sets_up() -> None:
    _jemalloc()
    assert planned_allocator("auto") == planned_allocator("jemalloc") == "jemalloc"
    assert _child_allocator(learner_environment(dict(os.environ), "auto")) == "jemalloc"
    assert planned_allocator("system") == "system"


def _child_allocator(env: dict[str, str]) -> str:
    code = "from workers.learner.allocator import allocator_in_use; print(allocator_in_use())"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, check=True,
                         capture_output=True, text=True)
    return out.stdout.strip()


def test_a_process_started_with_the_environment_runs_on_jemalloc() -> None:
    base = {"PATH": "/usr/bin:/bin"}
    assert _child_allocator(base) == "system"
    assert _child_allocator(learner_environment(base, "auto")) == "jemalloc"


def test_allocator_in_use_reads_the_process_maps(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert allocator_in_use(maps) == "jemalloc"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert allocator_in_use(maps) == "system"
    assert allocator_in_use(tmp_path / "missing") == "unknown"


_HOLD_FREE_RELEASE = """
import gc
from workers.learner.allocator import allocator_in_use, release_free_memory

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

base = rss_mib()
# Activation-sized blocks, as a training step allocates them: 64 × 4 MiB, written to.
blocks = [bytearray(4 << 20) for _ in range(64)]
for b in blocks:
    b[::4096] = b"x" * len(b[::4096])
held = rss_mib()
del blocks, b
gc.collect()
freed = rss_mib()
ok = release_free_memory()
print(allocator_in_use(), round(held - base), round(freed - base), round(rss_mib() - base), ok)
"""


def test_after_a_run_the_free_pages_go_back_to_the_os() -> None:
    env = learner_environment({"PATH": "/usr/bin:/bin"}, "jemalloc")
    out = subprocess.run([sys.executable, "-c", _HOLD_FREE_RELEASE], env=env, cwd=REPO,
                         check=True, capture_output=True, text=True).stdout.split()
    allocator_name, held, freed, released, ok = out[0], *map(int, out[1:4]), out[4]
    assert (allocator_name, ok) == ("jemalloc", "True")
    assert held >= 250  # 256 MiB touched
    # Decay off: jemalloc keeps what was freed for the next step...
    assert freed >= 200, (held, freed)
    # ...until it is asked to give it back.
    assert released <= 32, (held, freed, released)


def test_a_process_that_never_loaded_torch_has_no_gpu_cache_to_release() -> None:
    code = ("import sys; from workers.learner.allocator import release_gpu_cache; "
            "print(release_gpu_cache(), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out == ["False", "False"]  # and it did not import torch to find that out
    code = ("import torch; from workers.learner.allocator import release_gpu_cache; "
            "x = torch.ones(1, device='cuda') if torch.cuda.is_available() else None; "
            "print(release_gpu_cache() == torch.cuda.is_available())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out == ["True"]
