"""The pending set: targets gathered per zone and mode (``ZoneBucket``: deduplicated and
subsumed) until the dispatcher takes them out in request-sized batches.

A kind is *due* once a request's worth of it is pending or the window since the first pending
target has ended; what is due leaves only when the dispatcher takes it (when the budget can
send it), so under a backlog targets keep collapsing here instead of going out again and again.
Not thread-safe: only the loop's thread touches it. Time comes from the injected clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from worker.clock import Clock
from worker.pending.bucket import Owner, Pending, ZoneBucket
from worker.targets import Kind, Mode, Target

__all__ = ["Batch", "Coalescer", "Due", "Owner", "Pending"]


@dataclass
class Batch:
    zone_id: str
    mode: Mode
    kind: Kind
    items: list[Pending]
    # Wall-clock time just before the request went (set by the dispatcher), for the ledger.
    sent_at: float = 0.0

    @property
    def targets(self) -> list[Target]:
        return [p.target for p in self.items]


@dataclass(frozen=True)
class Due:
    """A kind of one zone and mode with targets ready to go."""

    first_at: float  # when the window of these targets began (oldest first)
    zone_id: str
    mode: Mode
    kind: Kind
    count: int
    whole: bool  # the window has ended (or a drain): everything goes, not only full requests


class Coalescer:
    def __init__(
        self, window_seconds: float, cap: Callable[[str, Kind], int], clock: Clock
    ) -> None:
        self._window = window_seconds
        self._cap = cap
        self._clock = clock
        self._buckets: dict[tuple[str, Mode], ZoneBucket] = {}

    @property
    def pending(self) -> int:
        return sum(b.size for b in self._buckets.values())

    def pending_by_kind(self) -> dict[tuple[str, Kind], int]:
        """Items pending per zone and kind (what the budget exchange reports as demand)."""
        out: dict[tuple[str, Kind], int] = {}
        for (zone_id, _), bucket in self._buckets.items():
            for kind in Kind:
                if n := bucket.count(kind):
                    out[(zone_id, kind)] = out.get((zone_id, kind), 0) + n
        return out

    def add(self, zone_id: str, mode: Mode, target: Target, owner: Owner) -> None:
        key = (zone_id, mode)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = ZoneBucket(self._clock.monotonic())
        bucket.add(target, owner)

    def next_due(self) -> float | None:
        """Monotonic time at which the next window ends, if one is still open (None if not)."""
        now = self._clock.monotonic()
        ends = [b.first_at + self._window for b in self._buckets.values()]
        upcoming = [end for end in ends if end > now]
        return min(upcoming) if upcoming else None

    def ready(self, *, drain: bool = False, defer: float = 0.0) -> list[Due]:
        """What is due now, oldest window first. ``drain`` makes everything due (shutdown);
        ``defer`` keeps every window open that much longer, full requests too."""
        now = self._clock.monotonic()
        out: list[Due] = []
        for (zone_id, mode), bucket in self._buckets.items():
            age = now - bucket.first_at
            if age < defer and not drain:
                continue
            whole = drain or age >= self._window + defer
            for kind in Kind:
                count = bucket.count(kind)
                if not count:
                    continue
                # "everything" is one item, always a whole request.
                all_of_it = whole or kind is Kind.EVERYTHING
                if all_of_it or count >= self._cap(zone_id, kind):
                    out.append(Due(bucket.first_at, zone_id, mode, kind, count, all_of_it))
        out.sort(key=lambda d: d.first_at)
        return out

    def count(self, zone_id: str, mode: Mode, kind: Kind) -> int:
        bucket = self._buckets.get((zone_id, mode))
        return bucket.count(kind) if bucket else 0

    def take(self, zone_id: str, mode: Mode, kind: Kind, limit: int) -> Batch:
        """Remove up to ``limit`` pending items of one kind, as a batch."""
        key = (zone_id, mode)
        bucket = self._buckets[key]
        batch = Batch(zone_id, mode, kind, bucket.take(kind, limit))
        if bucket.size == 0:
            del self._buckets[key]
        return batch

    def due(self, *, drain: bool = False) -> list[Batch]:
        """Every due batch now, whatever the budget: full requests, and everything whose window
        has ended (all of it with ``drain``). For callers without a budget to respect."""
        batches: list[Batch] = []
        for due in self.ready(drain=drain):
            cap = self._cap(due.zone_id, due.kind)
            while (n := self.count(due.zone_id, due.mode, due.kind)) and (due.whole or n >= cap):
                batches.append(self.take(due.zone_id, due.mode, due.kind, cap))
        return batches

    def flush_all(self) -> list[Batch]:
        """Every pending target, now."""
        return self.due(drain=True)

    def discard(self, drop: Callable[[Owner], bool]) -> int:
        """Forget pending work of owners for which ``drop`` is true (revoked partitions)."""
        removed = 0
        for key, bucket in list(self._buckets.items()):
            removed += bucket.discard(drop)
            if bucket.size == 0:
                del self._buckets[key]
        return removed
