"""Which offset each partition may commit: the one past the highest offset below which every
record is purged or dead-lettered (at-least-once: a crash repeats work, never skips it)."""

from __future__ import annotations

from collections import deque

from worker.events import TopicPartition


class _Partition:
    def __init__(self) -> None:
        self.pending: deque[int] = deque()
        self.done: set[int] = set()
        self.committable: int | None = None
        self.committed: int | None = None
        self.last_seen: int | None = None


class OffsetTracker:
    """Not thread-safe; owned by the loop's thread."""

    def __init__(self) -> None:
        self._parts: dict[TopicPartition, _Partition] = {}

    def track(self, tp: TopicPartition, offset: int) -> bool:
        """A record was taken from the partition. Returns False, tracking nothing, if the offset
        is not past the last one seen (the partition is being re-read): forget it first."""
        part = self._parts.get(tp)
        if part is None:
            part = self._parts[tp] = _Partition()
        if part.last_seen is not None and offset <= part.last_seen:
            return False
        part.pending.append(offset)
        part.last_seen = offset
        return True

    def complete(self, tp: TopicPartition, offset: int) -> None:
        part = self._parts.get(tp)
        if part is None:  # the partition was revoked meanwhile: its new owner redoes the work
            return
        part.done.add(offset)
        while part.pending and part.pending[0] in part.done:
            done = part.pending.popleft()
            part.done.discard(done)
            part.committable = done + 1

    def committable(self) -> dict[TopicPartition, int]:
        """Every partition's committable offset, committed or not."""
        return {tp: p.committable for tp, p in self._parts.items() if p.committable is not None}

    def to_commit(self) -> dict[TopicPartition, int]:
        """Offsets that moved since the last ``mark_committed``."""
        return {
            tp: p.committable
            for tp, p in self._parts.items()
            if p.committable is not None and p.committable != p.committed
        }

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            if tp in self._parts:
                self._parts[tp].committed = offset

    def forget(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            self._parts.pop(tp, None)

    def last_seen(self) -> dict[TopicPartition, int]:
        return {tp: p.last_seen for tp, p in self._parts.items() if p.last_seen is not None}
