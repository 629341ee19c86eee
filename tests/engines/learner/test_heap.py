"""The learner fixes glibc's mmap threshold so freed activation memory leaves the process."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from workers.learner import heap

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

# In a fresh interpreter (the allocator's state is process-wide): free a 16 MiB tensor, which by
# glibc's default raises the mmap threshold to 16 MiB, then allocate 4 MiB tensors and report
# how many bytes live in mmapped blocks (mallinfo2().hblkhd) while they are held.
PROBE = r"""
import ctypes, json, sys
import torch
from workers.learner import heap
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = heap.fix_mmap_threshold() if sys.argv[1] == "fixed" else None
big = torch.empty(16 * 2**20, dtype=torch.uint8); big.fill_(1); del big
before = libc.mallinfo2().hblkhd
held = [torch.ones(2**20) for _ in range(4)]  # 4 × 4 MiB float32
print(json.dumps({"applied": applied, "mmapped_growth": libc.mallinfo2().hblkhd - before}))
"""


def _probe(mode: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, timeout=120)
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_fixed_threshold_serves_activation_sized_blocks_by_mmap() -> None:
    default, fixed = _probe("default"), _probe("fixed")
    # glibc's dynamic threshold: after the 16 MiB block was freed, 4 MiB blocks come from the
    # heap, whose freed memory stays resident.
    assert default["mmapped_growth"] == 0
    # Fixed at 128 KiB: each 4 MiB block is its own mapping, unmapped again on free.
    assert fixed["applied"] is True
    assert isinstance(fixed["mmapped_growth"], int) and fixed["mmapped_growth"] >= 16 * 2**20


def test_threshold_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        heap.fix_mmap_threshold(0)
