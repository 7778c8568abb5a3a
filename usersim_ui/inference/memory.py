"""glibc malloc settings for a long-running process that runs torch on the CPU from many threads.

With glibc's defaults, a server like this one grows without a leak: every thread that
allocates under contention gets its own malloc arena (up to 8 per core), and after the first
large tensor is freed glibc raises its mmap threshold (up to 32 MB), so later prompt-sized
activations and KV caches come from those arenas instead of from mmap and are not returned
to the OS when freed. Gradio runs handlers in a pool of worker threads and the batch runner
in its own pool, so both patterns apply. :func:`limit_malloc_growth` caps the arenas and pins
the mmap threshold, which keeps large tensors in mmap (given back on free). The numbers it
was measured with are in ``docs/benchmarks.md`` (Soak). Linux/glibc only; elsewhere, and
where the environment already sets either knob, it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # mallopt parameters, from <malloc.h>
M_ARENA_MAX = -8
ARENAS = 2
MMAP_THRESHOLD_BYTES = 1 << 20  # tensors of 1 MiB and up: mmapped, returned to the OS when freed

_applied: dict[str, int] | None = None


def limit_malloc_growth(arenas: int = ARENAS, mmap_threshold: int = MMAP_THRESHOLD_BYTES) -> dict[str, int]:
    """Apply the settings once per process (before worker threads start, to cover their arenas);
    returns what was set (empty if nothing was)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = {}
    name = ctypes.util.find_library("c")
    if not name or os.uname().sysname != "Linux":
        return _applied
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return _applied  # not glibc (musl has no mallopt)
    if "MALLOC_ARENA_MAX" not in os.environ and mallopt(M_ARENA_MAX, arenas) == 1:
        _applied["arena_max"] = arenas
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ and mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1:
        _applied["mmap_threshold"] = mmap_threshold
    return _applied
