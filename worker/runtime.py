"""Process-wide tuning for the processes that run the loop or plan records."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

GC_THRESHOLD = 100_000
# glibc's mallopt parameter, and the threshold it starts with.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024


def tune_malloc() -> bool:
    """Keep glibc's threshold for serving a request with its own mapping fixed at its start
    value. By default every large block freed raises it (up to 32 MiB), so the large tables of
    the caches that start over, and of a backlog's bookkeeping, come from the heap from then on
    and stay as holes the next, larger ones do not fit: an hour's soak at 300 events a second
    showed the resident memory climbing in steps for thirty minutes with the live objects flat.
    Fixed, a freed table goes back to the system at once. Set before the planning process is
    forked, which inherits it. False where the C library has no ``mallopt`` (musl)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def tune_gc() -> None:
    """Move what start-up built (config, rules, clients) out of the collector's sight and let
    it run less often. The loop makes and drops small objects by the hundred thousand a second,
    almost none of them in cycles; the default thresholds spent a sixth of a backlog's time
    scanning them."""
    freeze_before_fork()
    tune_gc_forked()


def freeze_before_fork() -> None:
    """Before forking: everything built so far goes out of the collector's sight in both
    processes. A collection in the child would write to every object's header and so copy
    every page the two processes share (a forked child's memory is the parent's until written)."""
    gc.collect()
    gc.freeze()


def tune_gc_forked() -> None:
    """``tune_gc`` for a child forked after ``freeze_before_fork``: no collection first."""
    gc.set_threshold(GC_THRESHOLD, 50, 100)
