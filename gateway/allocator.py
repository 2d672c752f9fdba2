"""Keep freed heap memory for reuse instead of handing it back to the kernel (glibc).

A proxied body moves through buffers of up to a few hundred KiB (a socket read, a chunk
relayed). With glibc's defaults such a buffer is mmap'd and unmapped again, or the freed top of
the heap is trimmed, so the next body faults the same pages in afresh: at 64 connections of
1 MiB answers that was up to ~240 page faults and ~500 µs of kernel time per request, and req/s
fell to about half whenever it happened (benchmarks/README.md). Holding on to freed memory ends
that; the price is that RSS stays near its high-water mark under load, bounded by
``trim_threshold`` of free memory kept at the top of the heap.

glibc reads ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` (or ``GLIBC_TUNABLES``) at
start-up: where an operator set either, their choice stands and nothing is changed here.
"""

from __future__ import annotations

import ctypes
import os

MMAP_THRESHOLD = 4 * 1024 * 1024  # larger requests than this still get pages of their own
TRIM_THRESHOLD = 32 * 1024 * 1024  # at most this much free memory is kept at the heap's top

# mallopt parameters (glibc <malloc.h>)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_OPERATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory(
    *, mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD
) -> bool:
    """Tune glibc's allocator for a streaming proxy; True if it was changed.

    Does nothing (False) on another C library, or where the operator's environment tunes the
    allocator already. Process-wide: the CLI calls it; an app that mounts the gateway decides
    for itself.
    """
    if any(os.environ.get(name) for name in _OPERATOR_SETTINGS):
        return False
    if not _is_glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # Setting either fixes both (glibc stops adjusting them itself): set both. 1 is success.
    return bool(
        mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
        and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    )


def _is_glibc() -> bool:
    """Whether the running C library is glibc (asked of the library itself)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):  # a name this platform's confstr does not know
        return False
