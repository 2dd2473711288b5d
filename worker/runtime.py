"""Process-wide tuning for the processes that run the loop or plan records."""

from __future__ import annotations

import gc

GC_THRESHOLD = 100_000


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
