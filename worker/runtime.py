"""Process-wide tuning for the processes that run the loop or plan records."""

from __future__ import annotations

import gc

GC_THRESHOLD = 100_000
# glibc's mallopt parameters, the threshold it starts with, and the arenas the worker needs.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024
M_ARENA_MAX = -8
ARENA_MAX = 2


def tune_malloc() -> bool:
    """Keep glibc's threshold for serving a request with its own mapping fixed at its start
    value. By default every large block freed raises it (up to 32 MiB), so the large tables of
    the caches that start over, and of a backlog's bookkeeping, come from the heap from then on
    and stay as holes the next, larger ones do not fit: an hour's soak at 300 events a second
    showed the resident memory climbing in steps for thirty minutes with the live objects flat.
    Fixed, a freed table goes back to the system at once. Set before the planning process is
    forked, which inherits it.

    And at most two arenas: by default each thread that meets another in ``malloc`` gets an
    arena of its own (up to eight per core), and the worker's request, receipts, feed and Kafka
    threads each allocate a little now and then; every arena keeps its own free holes, so the
    sum creeps up long after the live objects are flat (the soak's worker rose ~0.3 MiB a minute
    for twenty minutes past its warm-up). The interpreter's own allocator serves small objects
    under its lock anyway, so two arenas cost no waiting worth measuring.
    False where the C library has no ``mallopt`` (musl)."""
    import ctypes.util  # noqa: PLC0415 (only ``run`` and ``replay`` need it; every command starts here)

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        arenas = bool(libc.mallopt(M_ARENA_MAX, ARENA_MAX))
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and arenas
    except (OSError, AttributeError):
        return False


def tune_gc() -> None:
    """Move what start-up built (config, rules, clients) out of the collector's sight and let
    it run less often. The loop makes and drops small objects by the hundred thousand a second,
    almost none of them in cycles; the default thresholds spent a sixth of a backlog's time
    scanning them. Collected first: a start-up that retried an unreachable broker leaves the
    cycles of its failed attempts, which frozen would stay for good (what was frozen before the
    fork is not looked at again, so this looks at what the clients made since)."""
    gc.collect()
    freeze_before_fork()
    tune_gc_thresholds()


def freeze_before_fork() -> None:
    """Before forking: everything built so far goes out of the collector's sight in both
    processes. A collection in the child would write to every object's header and so copy
    every page the two processes share (a forked child's memory is the parent's until written).
    Not collected first: before the fork nothing has met the network yet, and after
    ``tune_gc_thresholds`` a full collection here found nothing to free (0 objects, measured after
    ``run``'s imports) and cost 9 ms on the way to the first records."""
    gc.freeze()


def tune_gc_thresholds() -> None:
    """``tune_gc``'s thresholds alone, with nothing collected or frozen: at a command's start,
    before its imports (by default the collector ran 144 young collections while ``run``
    imported its modules, 15 ms of its start-up, and found 23 objects to free), and in a child
    forked after ``freeze_before_fork``."""
    gc.set_threshold(GC_THRESHOLD, 50, 100)
