"""Keep freed heap memory in the process rather than hand it back to the kernel (glibc).

A DP-SGD step makes each sample's gradient of every parameter: for the 3D SegResNet at
batch 16 about 360 MB, allocated and freed every step. glibc may hand large freed blocks
back to the kernel (``munmap``, or trimming the heap's top), and the next step then
faults every page in again, zeroed. glibc's own adaptive threshold avoids that in some
processes and not in others: in three fresh processes the 3D DP step faulted 0.5, 82 k
and 101 k pages (median per step; plain steps none), its ratio to the plain step 1.13,
1.21 and 1.22; with this setting 0, 0.5 and 41 k pages, 1.13, 1.14 and 1.18
(2026-12-07, 2 cores). It does not cover blocks of glibc's 32 MiB maximum and more: in
a process that had trained 2D models first, 110-118 k faults per 3D DP step remained.

:func:`keep_freed_memory` fixes both thresholds: blocks below 32 MiB come from the heap,
and up to ``TRIM_THRESHOLD`` (512 MiB) of free memory stays there. The cost: a site
worker's resident memory stays near its peak between steps, up to 512 MiB above what it
uses.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Mapping

#: mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest mmap threshold on 64-bit systems (HEAP_MAX_SIZE / 2).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free memory a process keeps at its heap's top; above it, glibc trims as usual.
TRIM_THRESHOLD = 512 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Set glibc's thresholds (see the module's docstring); False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


#: The environment (glibc reads it at start) of a process that lives for one run and
#: handles model-size buffers every round: a run's ServerApp. Blocks above 32 MiB (a
#: 50M model's 200 MB reply, its chunks joined, the sum) come from one heap and stay
#: there when freed, so the next reply reuses them instead of faulting in fresh pages
#: (about 49 k page faults and 0.1 s per two 200 MB buffers on the 2-core machine;
#: none with these three set, and only with all three: a thread's own arena, or
#: glibc's cap on its thresholds, would still hand such blocks to mmap). A 50M round's
#: ServerApp took 23.8 CPU s over 5 rounds with them, 35-43 s in four runs without
#: (2026-12-07). The cost is resident memory at the run's peak until the run ends.
#: Long-running processes (SuperLink, SuperNodes, site daemons) keep glibc's defaults.
MODEL_BUFFER_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(1 << 32),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 32),
}


def with_model_buffers(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` plus :data:`MODEL_BUFFER_ENV` where it sets none of glibc's own."""
    if any(key.startswith("MALLOC_") or key == "GLIBC_TUNABLES" for key in env):
        return dict(env)  # an operator's own malloc settings win, all of them
    return {**env, **MODEL_BUFFER_ENV}
