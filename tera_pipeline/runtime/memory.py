"""Process-level tuning for the CPU path."""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from functools import lru_cache

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Stop glibc from returning every freed activation buffer to the kernel.

    torch frees and re-allocates multi-MB activations on every forward; with glibc's defaults
    each one is a fresh mmap or a trimmed heap, and page faults then cost about as much system
    time as the convolutions take user time (measured: 15-40 % of a worker's wall time). Keeping
    up to 1 GiB of freed heap and serving buffers below 32 MiB from it removes that. Returns
    False where the C library is not glibc.
    """
    libc = _libc()
    try:
        ok = libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
        return bool(ok and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1)
    except AttributeError:
        return False


TRIM_EVERY_S = 30.0
"""How often a long-running worker gives its free heap back (``return_freed_memory``)."""

_last_trim = [time.monotonic()]
_trim_lock = threading.Lock()


def return_freed_memory(every_s: float = TRIM_EVERY_S) -> bool:
    """Give the pages that are free in glibc's heaps back to the kernel (``malloc_trim``), at
    most once every ``every_s`` seconds; returns whether it trimmed now.

    ``keep_freed_memory`` keeps freed buffers for reuse, so a worker's resident memory would
    otherwise keep the high-water mark of every thread's heap, fragments included, for the
    whole run. Trimming twice a minute costs the page faults of one re-use, not of every one.
    """
    now = time.monotonic()
    if now - _last_trim[0] < every_s or not _trim_lock.acquire(blocking=False):
        return False
    try:
        _last_trim[0] = now
        libc = _libc()
        return bool(libc is not None and libc.malloc_trim(0))
    except AttributeError:
        return False
    finally:
        _trim_lock.release()


@lru_cache(maxsize=1)
def _libc():
    """The C library, or None where it cannot be loaded."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
