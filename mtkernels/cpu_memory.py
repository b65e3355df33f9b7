"""Keep freed CPU memory for reuse instead of returning it to the OS.

glibc serves an allocation larger than its mmap threshold (dynamic, at most 32 MiB) with
fresh pages and unmaps them on free, and trims the heap top above its trim threshold. A
training step allocates and frees the same large activations and gradients every step, so
each step faults many of their pages in again: on this project's 2-core machine, allocating
and filling a 38 MB activation takes 8.7 ms against 1.4 ms for writing the same bytes into
a buffer that already exists, and a BKNet training step at batch 64 takes 30-40 thousand
page faults (tests/test_cpu_memory.py). Measured in fresh processes, BKNet's plain
PyTorch training step at batch 128 went from 0.63-0.64 s to 0.49-0.50 s, and the
mtkernels step from 0.44-0.46 s to 0.38-0.39 s. How much a process pays depends on what it
ran before (the threshold adapts), which is why the benchmarks run with it on.
``retain_freed_memory()`` raises both thresholds so the process keeps and reuses that
memory; the cost is a resident size that stays at the step's peak. It changes the process's
allocator for good (the dynamic default cannot be restored), works with glibc only, and does
nothing where it cannot apply.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LIMIT = 2**31 - 1  # mallopt takes an int


@functools.lru_cache(maxsize=None)
def retain_freed_memory() -> bool:
    """Make glibc keep freed memory of any size for reuse; True if it took effect."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _LIMIT)) and bool(mallopt(_M_TRIM_THRESHOLD, _LIMIT))
