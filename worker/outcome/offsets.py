"""Which offset each partition may commit: the one past the highest offset below which every
record is purged or dead-lettered (at-least-once: a crash repeats work, never skips it).

Records are tracked a run at a time: the records of one partition taken in one poll. A run is
unplanned (every record in it unfinished) until its plans are applied; then only the offsets
still waiting are kept, and in a backlog most runs have none (every record was skipped or
already purged), so a run of two thousand records finishes as one.
"""

from __future__ import annotations

from collections import deque

from worker.events import TopicPartition


class Run:
    """Offsets taken from one partition in one poll, in order."""

    __slots__ = ("_pos", "alive", "offsets", "seq", "waiting")

    def __init__(self, offsets: list[int], seq: int) -> None:
        self.offsets = offsets
        self.seq = seq  # tells records read again after a rebalance from their earlier copies
        # None until planned (all unfinished), then the offsets still unfinished.
        self.waiting: set[int] | None = None
        self.alive = True  # False once its partition is forgotten
        self._pos = 0  # offsets before it are finished (while ``waiting`` is not empty)

    def advance(self) -> int | None:
        """The offset past the finished records at its front, if any are."""
        waiting = self.waiting
        if waiting is None:
            return None
        offsets = self.offsets
        if not waiting:
            return offsets[-1] + 1
        pos = self._pos
        while offsets[pos] not in waiting:
            pos += 1
        self._pos = pos
        return offsets[pos - 1] + 1 if pos else None


class _Partition:
    def __init__(self) -> None:
        self.runs: deque[Run] = deque()
        self.committable: int | None = None
        self.committed: int | None = None
        self.last_seen: int | None = None
        self.last_planned: int | None = None


class OffsetTracker:
    """Not thread-safe; owned by the loop's thread."""

    def __init__(self) -> None:
        self._parts: dict[TopicPartition, _Partition] = {}

    def track(self, tp: TopicPartition, offsets: list[int], seq: int) -> Run | None:
        """A run of records was taken from the partition (``offsets`` ascending). Returns None,
        tracking nothing, if it does not start past the last offset seen (the partition is
        being read again): forget it first."""
        part = self._parts.get(tp)
        if part is None:
            part = self._parts[tp] = _Partition()
        if part.last_seen is not None and offsets[0] <= part.last_seen:
            return None
        run = Run(offsets, seq)
        part.runs.append(run)
        part.last_seen = offsets[-1]
        return run

    def planned(self, tp: TopicPartition, run: Run, waiting: set[int]) -> None:
        """The run's plans are applied; ``waiting``: its offsets still unfinished."""
        run.waiting = waiting
        self._parts[tp].last_planned = run.offsets[-1]
        self._advance(tp)

    def complete(self, tp: TopicPartition, offset: int) -> None:
        part = self._parts.get(tp)
        if part is None:  # the partition was revoked meanwhile: its new owner redoes the work
            return
        for run in part.runs:
            if run.waiting is not None and run.offsets[0] <= offset <= run.offsets[-1]:
                run.waiting.discard(offset)
                break
        self._advance(tp)

    def _advance(self, tp: TopicPartition) -> None:
        part = self._parts[tp]
        runs = part.runs
        while runs:
            done = runs[0].advance()
            if done is not None:
                part.committable = done
            if runs[0].waiting is None or runs[0].waiting:
                return
            runs.popleft()

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

    def forget(self, tps: set[TopicPartition]) -> int:
        """Stop tracking ``tps``; returns how many of their records were still unplanned."""
        unplanned = 0
        for tp in tps:
            part = self._parts.pop(tp, None)
            if part is None:
                continue
            for run in part.runs:
                run.alive = False
                if run.waiting is None:
                    unplanned += len(run.offsets)
        return unplanned

    def last_seen(self) -> dict[TopicPartition, int]:
        """Per partition, the last offset read."""
        return {tp: p.last_seen for tp, p in self._parts.items() if p.last_seen is not None}

    def last_planned(self) -> dict[TopicPartition, int]:
        """Per partition, the last offset whose plan is applied: records read ahead of their
        plans (``planning.stage``) are still to come for what judges a backlog's reading."""
        return {tp: p.last_planned for tp, p in self._parts.items() if p.last_planned is not None}
