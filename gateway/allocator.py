"""Keep freed heap memory for reuse instead of handing it back to the kernel (glibc).

A proxied body moves through buffers of up to a few hundred KiB (a socket read, a chunk
relayed). With glibc's defaults such a buffer is mmap'd and unmapped again, or the freed top of
the heap is trimmed, so the next body faults the same pages in afresh: at 64 connections of
1 MiB answers that was up to ~240 page faults and ~500 µs of kernel time per request, and req/s
fell by a third to a half whenever it happened (benchmarks/README.md, "1 MiB answers and the
allocator"). Holding on to freed memory ends that. The price: RSS stays near its high-water mark
under load. Up to ``trim_threshold`` of free memory stays at the top of each heap (the main one,
and one per thread that allocates), and freed blocks below live ones stay as they always did.

Where the operator chose already, nothing is changed: glibc reads ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_`` and ``GLIBC_TUNABLES=glibc.malloc.…`` at start-up, and an allocator
put in with ``LD_PRELOAD`` (jemalloc, tcmalloc, mimalloc) does not use glibc's settings at all.
"""

from __future__ import annotations

import ctypes
import os

MMAP_THRESHOLD = 4 * 1024 * 1024  # larger requests than this still get pages of their own
TRIM_THRESHOLD = 32 * 1024 * 1024  # free memory kept at the top of a heap before trimming

# mallopt parameters (glibc <malloc.h>)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The environment through which an operator chooses for the allocator: each variable, and what
# in its value says so ("": any value).
OPERATOR_CHOICES = {
    "MALLOC_MMAP_THRESHOLD_": "",
    "MALLOC_TRIM_THRESHOLD_": "",
    "GLIBC_TUNABLES": "glibc.malloc.",
    "LD_PRELOAD": "malloc",
}


def keep_freed_memory(
    *, mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD
) -> bool:
    """Tune glibc's allocator for a streaming proxy; True if it was changed.

    Does nothing (False) where the operator's environment chose for the allocator already (see
    the module docstring) or the C library is not glibc. Process-wide: the CLI calls it; an app
    that mounts the gateway decides for itself.
    """
    if _operator_chose() or not _is_glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # Setting either fixes both (glibc stops adjusting them itself): set both. 1 is success
    # (a 32-bit glibc refuses an mmap threshold over 512 KiB: nothing is changed then).
    return bool(
        mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
        and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    )


def _operator_chose() -> bool:
    return any(
        marker in value
        for name, marker in OPERATOR_CHOICES.items()
        if (value := os.environ.get(name))
    )


def _is_glibc() -> bool:
    """Whether the running C library is glibc (asked of the library itself)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # a name this confstr does not know; Windows
        return False
