"""Keep the learner's resident memory at what its tensors need.

glibc's ``malloc`` serves blocks of at least ``M_MMAP_THRESHOLD`` with ``mmap`` (returned to the
OS on ``free``) and smaller ones from the heap (kept resident after ``free``). By default the
threshold is *dynamic*: every freed mmapped block raises it to that block's size, up to 32 MiB
on 64-bit. A training step allocates and frees activation tensors of 4-17 MiB, so after the first
micro-batch they all come from the heap, and the heap keeps the largest step's working set
resident on top of the live tensors: measured on a ~107 M-parameter model, peak RSS 1.68-1.75×
the floor (model + LoRA + AdamW state + analytic activations) by default against 1.02× with a
fixed 128 KiB threshold (``benchmarks/findings.md``). Setting the threshold explicitly also turns
the dynamic adjustment off. Large blocks then cost an ``mmap``/``munmap`` pair and fresh page
faults each; next to a transformer layer's arithmetic on such a block this is small (the learner
benchmark's OAPL step time is measured with the setting in force).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter number (malloc.h)."""
DEFAULT_THRESHOLD_BYTES = 128 * 1024
"""glibc's own starting value; fixed here instead of growing with every freed activation."""

_applied: int | None = None


def fix_mmap_threshold(threshold_bytes: int = DEFAULT_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold for this process so freed activations go back to the OS.

    Returns whether the setting is in force: False where the C library is not glibc (musl, macOS,
    Windows), which do not keep freed large blocks the same way. Idempotent; the process keeps
    the setting (it is process-wide, as the learner's process is)."""
    global _applied
    if threshold_bytes <= 0:
        raise ValueError(f"threshold_bytes must be positive, got {threshold_bytes}")
    if _applied == threshold_bytes:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold_bytes)) != 1:
        return False  # glibc refuses values above its maximum (32 MiB on 64-bit)
    _applied = threshold_bytes
    return True
