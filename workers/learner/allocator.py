"""The learner process's memory allocator: jemalloc with decay off, preloaded at process start.

Why: a training step allocates and frees activation-sized blocks (tens to hundreds of MiB) in an
order glibc's malloc fragments; its arenas keep the holes, so a learner's peak RSS sits ~1.6–1.8×
the bytes it actually holds (model, LoRA, AdamW state and one micro-batch's activations) at
~100M parameters. jemalloc with its dirty/muzzy decay off reuses those extents and peaks at
~1.04–1.07× with no slower steps or sampling; with its default 10 s decay it peaks low too but the
purging's page faults make steps ~1.5× slower (``benchmarks/findings.md``, "allocator").

An allocator cannot be swapped inside a running process: the train worker (and the ranks of a
data-parallel round, which inherit its environment) must START with ``LD_PRELOAD`` naming the
library. ``learner_environment`` gives that environment (``planned_allocator`` names what it
sets up); ``allocator_in_use`` says what a process
actually got (recorded in each run's manifest); ``release_free_memory`` gives the kept extents
back after a run.

Choices (the ``TRACELEARN_LEARNER_ALLOCATOR`` setting): ``auto`` jemalloc when the library is
installed (Debian/Ubuntu ``libjemalloc2``; the Docker image has it), else the C library's
malloc; ``jemalloc`` required (an error when missing); ``system`` the C library's malloc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

AllocatorChoice = Literal["auto", "jemalloc", "system"]

JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
"""Freed extents are kept for reuse, never purged back to the OS while the process lives: the
learner's working set repeats every step, so purging only buys page faults."""

_JEMALLOC_GLOBS = (
    "/usr/lib/*-linux-gnu/libjemalloc.so.2",  # Debian, Ubuntu (multiarch)
    "/usr/lib64/libjemalloc.so.2",  # Fedora, RHEL
    "/usr/lib/libjemalloc.so.2",  # Alpine, Arch
    "/usr/local/lib/libjemalloc.so.2",  # built from source
)


class AllocatorUnavailable(RuntimeError):
    """``jemalloc`` was asked for and the library is not installed."""


def find_jemalloc() -> Path | None:
    """The jemalloc shared library's path, or None when it is not installed."""
    for pattern in _JEMALLOC_GLOBS:
        for hit in sorted(glob.glob(pattern)):
            return Path(hit)
    name = ctypes.util.find_library("jemalloc")  # ldconfig's cache: other layouts
    if name:
        for directory in ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib"):
            candidate = Path(directory) / name
            if candidate.exists():
                return candidate
    return None


def planned_allocator(choice: AllocatorChoice) -> Literal["jemalloc", "system"]:
    """The allocator a learner process started under ``choice`` gets on this machine. Raises
    ``AllocatorUnavailable`` for ``jemalloc`` without the library."""
    if choice == "system":
        return "system"
    if find_jemalloc() is not None:
        return "jemalloc"
    if choice == "jemalloc":
        raise AllocatorUnavailable(
            "learner_allocator is 'jemalloc' but libjemalloc.so.2 is not installed "
            "(Debian/Ubuntu: apt-get install libjemalloc2; or set "
            "TRACELEARN_LEARNER_ALLOCATOR=auto or system)"
        )
    return "system"


def learner_environment(
    base: Mapping[str, str], choice: AllocatorChoice
) -> dict[str, str]:
    """``base`` with the allocator of ``choice`` set up for a process started with it.

    jemalloc: its library first in ``LD_PRELOAD`` (entries already there are kept after it) and
    ``MALLOC_CONF`` = ``JEMALLOC_CONF`` unless ``base`` sets its own. ``system`` returns ``base``
    as given (an operator's own ``LD_PRELOAD`` stays theirs). Raises ``AllocatorUnavailable`` for
    ``jemalloc`` without the library."""
    env = dict(base)
    lib = find_jemalloc()
    if planned_allocator(choice) == "system" or lib is None:
        return env
    preload = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p]
    if not any("libjemalloc" in Path(p).name for p in preload):
        preload.insert(0, str(lib))
    env["LD_PRELOAD"] = " ".join(preload)
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return env


_ALL_ARENAS = 4096
"""jemalloc's ``MALLCTL_ARENAS_ALL``: ``arena.<i>.purge`` with it purges every arena."""


def release_free_memory() -> bool:
    """Hand the allocator's free pages back to the OS; whether it could.

    With decay off, jemalloc keeps every freed extent for reuse, which is what a training step
    wants and what an idle train worker does not: between runs it would hold its last run's
    peak. So after a run: jemalloc purges every arena (``mallctl("arena.4096.purge")``), the C
    library's malloc trims its heaps (``malloc_trim(0)``). Neither touches live memory."""
    process = ctypes.CDLL(None)  # the symbols this process resolved: the preloaded library first
    if allocator_in_use() == "jemalloc" and hasattr(process, "mallctl"):
        mallctl = process.mallctl
        mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_size_t]
        return int(mallctl(f"arena.{_ALL_ARENAS}.purge".encode(), None, None, None, 0)) == 0
    if hasattr(process, "malloc_trim"):
        process.malloc_trim.argtypes = [ctypes.c_size_t]
        process.malloc_trim(0)
        return True
    return False


def release_gpu_cache() -> bool:
    """Hand torch's cached GPU blocks back to the driver; whether there were any to hand back.

    After a run on a GPU the caching allocator keeps the run's peak reserved for this process,
    where vLLM on the same GPU, or the next run's ranks, would want it. torch is looked up, not
    imported: a process that never loaded it has no GPU memory to give back (and the API
    process must not pay seconds to load it)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return False
    torch.cuda.empty_cache()
    return True


def allocator_in_use(maps: Path = Path("/proc/self/maps")) -> str:
    """``jemalloc`` when the process has the library mapped, else ``system``; ``unknown`` where
    there is no /proc to read."""
    try:
        text = maps.read_text()
    except OSError:
        return "unknown"
    return "jemalloc" if "libjemalloc" in text else "system"
