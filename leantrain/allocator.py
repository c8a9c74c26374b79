"""Make freed tensor memory leave the process at once, so peak RSS follows the live tensors.

On CPU every tensor is a C-library ``malloc``. glibc raises its mmap threshold to the size of the largest block
freed so far (up to 32 MiB) and serves smaller blocks from heaps it keeps after they are freed, so a training
step's activations and optimizer temporaries leave hundreds of MiB resident that no tensor uses (measured in
docs/bigmodel.md: LLaMA-350m bf16, 0.90 GiB above the tensors with glibc's default, 0.56 GiB with this).
Fixing the threshold at 128 KiB maps each larger block on its own and unmaps it on ``free``; the cost is a page
fault (and the kernel zeroing the page) for every fresh page, every step: 1.3-1.6x s/step at LLaMA-130m bf16, so
it is opt-in (``--return-freed-memory``). Process-wide and irreversible for the process; a no-op outside glibc
(macOS, Windows, musl) and for CUDA memory (its own caching allocator).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 128 * 1024  # glibc's initial default; setting it explicitly turns the dynamic raise off
_applied = False


def return_freed_memory(threshold: int = THRESHOLD_BYTES) -> bool:
    """Map every allocation of at least ``threshold`` bytes on its own and trim the heap above it; True if applied."""
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = libc.mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1 and libc.mallopt(M_TRIM_THRESHOLD, int(threshold)) == 1
    _applied = ok
    return ok


def applied() -> bool:
    """Whether this process returns freed memory (for metrics and tests)."""
    return _applied
