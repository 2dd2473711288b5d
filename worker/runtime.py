"""Process-wide tuning for the processes that run the loop or plan records."""

from __future__ import annotations

import gc

GC_THRESHOLD = 100_000


def tune_gc() -> None:
    """Move what start-up built (config, rules, clients) out of the collector's sight and let
    it run less often. The loop makes and drops small objects by the hundred thousand a second,
    almost none of them in cycles; the default thresholds spent a sixth of a backlog's time
    scanning them."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 50, 100)
