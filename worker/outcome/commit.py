"""When offsets are committed: every ``interval`` behind finished records, at once when the last
record in flight has finished (the end of a backlog, or a lone event: nothing is gained by
waiting, and a restart would redo it), a failed commit tried again after a pause, and the last
one at shutdown.

A commit waits no longer than an idle poll; one that fails is tried again after a pause, so a
broker outage costs the loop a little time every few seconds, never a blocked loop.
"""

from __future__ import annotations

from typing import Protocol

from worker.clock import Clock
from worker.events import TopicPartition
from worker.outcome.inflight import InFlightRecords

COMMIT_WAIT = 0.5
COMMIT_RETRY = 5.0


class Committer(Protocol):
    """The part of a source that commits (``worker.intake.source.Source``)."""

    def commit(self, offsets: dict[TopicPartition, int], timeout: float) -> bool: ...

    def finished(self, offsets: dict[TopicPartition, int]) -> None: ...


class CommitPolicy:
    def __init__(
        self, records: InFlightRecords, committer: Committer, clock: Clock, interval: float
    ) -> None:
        self._records = records
        self._committer = committer
        self._clock = clock
        self._interval = interval
        self._last = 0.0
        self._retry_at = 0.0

    def offer(self) -> None:
        """Tell the source what may be committed now (a rebalance commits it before the
        partitions change hands). Never blocks."""
        self._committer.finished(self._records.committable())

    def maybe_commit(self) -> None:
        """Commit if the interval has passed, or nothing is in flight any more and something is
        not yet committed (and no failed commit is waiting to be retried)."""
        now = self._clock.monotonic()
        if now < self._retry_at:
            return
        if now - self._last >= self._interval or (
            not len(self._records) and self._records.to_commit()
        ):
            self.commit()
            self._last = now

    def commit(self, wait: float = COMMIT_WAIT) -> None:
        """Commit every offset below which all records are finished, waiting at most ``wait``
        seconds for the broker."""
        offsets = self._records.to_commit()
        if not offsets:
            return
        if self._committer.commit(offsets, timeout=wait):
            self._records.mark_committed(offsets)
        else:
            self._retry_at = self._clock.monotonic() + COMMIT_RETRY
