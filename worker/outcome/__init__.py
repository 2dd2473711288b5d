"""Records out: in-flight bookkeeping, finishing, dead letters and their guard, commits, warming."""
