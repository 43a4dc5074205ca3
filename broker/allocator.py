"""glibc allocator thresholds for a process that encodes and decodes ~130 KB messages (bench/broker.py).

A module of its own: it is process-wide tuning, not stream logic, and only the broker benchmark applies it today.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
ALLOC_MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
"""Messages are ~130 KB, just above glibc's default 128 KB mmap threshold, so every encode, reply and decode
would get fresh zero pages from the kernel and fault on each of them: on a VM that is 3 us a page and tripled
the codec's cost. Above this size allocations still go to mmap."""


def tune_allocator(mmap_threshold: int = ALLOC_MMAP_THRESHOLD_BYTES) -> bool:
    """Keep message-sized buffers on glibc's heap instead of fresh mmap'd pages; returns whether it applied.

    Process-wide, so roles call it once at start-up (a no-op returning False off glibc).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # Fixing the mmap threshold turns off glibc's dynamic adjustment; the trim threshold keeps freed heap
    # (which would otherwise go back to the kernel and fault in again on the next message).
    ok = mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    ok = mallopt(M_TRIM_THRESHOLD, int(4 * mmap_threshold)) == 1 and ok
    log.debug("malloc mmap threshold %d bytes: %s", mmap_threshold, "set" if ok else "not set")
    return ok
