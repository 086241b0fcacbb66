"""Host allocator tuning for XLA:CPU (glibc malloc).

XLA:CPU allocates every intermediate buffer of an update with malloc and frees it afterwards.
glibc returns such memory to the kernel (large blocks are mmap'd and unmapped; the heap top is
trimmed), so the next update touches fresh pages again. On virtual machines where a first
touch is slow (this project's CI machine: 3.2 us per 4 KiB page, 75x a rewrite of the same
memory) the zero-filled scan buffers and their copies took 40% of a tiny-model update.
`tune_malloc` keeps freed memory in the process instead: every block comes from the one
(main) arena's heap, never from mmap, and the heap is never trimmed (256 MiB of top padding).
Measured: a tiny update on one core 0.28 -> 0.16 s; the small model's update went from 711k
page faults (2.8 GB of fresh pages, XLA's per-call temporary buffer included) to none, and
the process's peak memory is unchanged (benchmarks/RESULTS.md).

The launch scripts, benchmarks, evaluation CLI and tests call it first thing; code importing
the library calls it itself if it wants it. `DALI_JAX_TUNE_MALLOC=0` turns it off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h). mallopt's value is a C int; glibc converts the trim
# threshold to size_t, so -1 means "never" (2**31 - 1 would still trim a heap above 2 GiB).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8
SETTINGS = ((M_TRIM_THRESHOLD, -1), (M_TOP_PAD, 256 << 20), (M_MMAP_MAX, 0), (M_ARENA_MAX, 1))

_done: bool | None = None


def tune_malloc() -> bool:
    """Applies `SETTINGS` with glibc's mallopt once per process; True when applied.

    A no-op (False) off Linux/glibc or with DALI_JAX_TUNE_MALLOC=0. Call it before the first
    jitted computation runs: the arena limit only binds threads that have not allocated yet.
    """
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("DALI_JAX_TUNE_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in SETTINGS)
    if not ok:
        log.warning("mallopt rejected part of the allocator tuning; continuing without it")
    _done = ok
    return ok
