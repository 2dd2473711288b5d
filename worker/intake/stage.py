"""The intake stage: records from the source, and what the loop decides about taking more.

While the group rebalances, the worker sends nothing new (for at most ``HANDOVER_HOLD``): what
it has pending may be another replica's in a moment. When the worker's own backlog is full it
pauses the source (which keeps polling, so the member stays in the group) and resumes it below
80 % of the limits. It reports each partition's lag now and then, and forgets a partition's lag
once the partition is gone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import structlog

from worker.clock import Clock
from worker.config.model import CoalesceSettings
from worker.events import Record, TopicPartition
from worker.intake.source import Source
from worker.observe import metrics

log = structlog.get_logger("worker.intake")

HANDOVER_HOLD = 5.0
LAG_INTERVAL = 5.0


class Intake:
    def __init__(
        self, source: Source, limits: CoalesceSettings, clock: Clock, *, max_poll_records: int
    ) -> None:
        self.source = source
        self._limits = limits
        self._clock = clock
        self._max = max_poll_records
        self._paused = False
        self._rebalance_seen: float | None = None
        self._assigned = 0
        self._total = 0
        self._last_lag = 0.0
        self._backlog = False  # see ``read_to_end``

    def poll(self, timeout: float) -> list[Record]:
        """Records in offset order per partition; blocks up to ``timeout`` seconds."""
        return self.source.poll(timeout, self._max)

    def on_revoke(self, settle: Callable[[], bool]) -> None:
        """What a revocation calls before the partitions change hands (``Source.on_revoke``)."""
        self.source.on_revoke(settle)

    def take_revoked(self) -> set[TopicPartition]:
        """Partitions lost since the last call; their lag is no longer this worker's to say."""
        revoked = self.source.take_revoked()
        for topic, partition in revoked:
            metrics.forget_lag(topic, partition)
        return revoked

    def holding(self) -> bool:
        """True while the group rebalances (up to ``HANDOVER_HOLD``): nothing new is sent."""
        if not self.source.rebalance_pending():
            self._rebalance_seen = None
            return False
        now = self._clock.monotonic()
        if self._rebalance_seen is None:
            self._rebalance_seen = now
            log.info("group rebalancing: no new requests until it is over")
        return now - self._rebalance_seen < HANDOVER_HOLD

    def backpressure(self, pending_targets: int, pending_records: int) -> None:
        """Pause the source past either limit; resume it below 80 % of both."""
        metrics.PENDING_TARGETS.set(pending_targets)
        metrics.PENDING_RECORDS.set(pending_records)
        most_targets, most_records = (
            self._limits.max_pending_targets,
            self._limits.max_pending_records,
        )
        over = pending_targets >= most_targets or pending_records >= most_records
        under = pending_targets < most_targets * 0.8 and pending_records < most_records * 0.8
        if over != self._paused and (over or under):
            # While paused the pending set keeps going out as fast as the budget allows.
            (self.source.pause if over else self.source.resume)()
            self._paused = over
            metrics.PAUSED.set(int(over))
            log.info(
                "consumption paused: backlog" if over else "consumption resumed",
                pending_targets=pending_targets,
                pending_records=pending_records,
            )

    def behind(self, consumed: Mapping[TopicPartition, int]) -> bool:
        """More than a poll's worth of records is still to be read (from the last consumed
        offsets), paused for the backlog or not."""
        return self._behind(self.source.lag(dict(consumed)))

    def _behind(self, lags: Mapping[TopicPartition, int]) -> bool:
        return sum(lags.values()) > self._max

    def read_to_end(
        self,
        pending: bool,
        consumed: Callable[[], Mapping[TopicPartition, int]],
        budget_bound: Callable[[], bool],
    ) -> bool:
        """A backlog was being read (more than a poll behind) since nothing was last
        ``pending``, and now all of it is, with budget to spare (not ``budget_bound()``):
        nothing more can join what it left pending, which may go without waiting out its
        windows (a drain's last items waited up to a window after its last record was read).
        A trickle, never a poll's worth behind, keeps its windows; so does a backlog the
        budget still holds back (its windows pass while it waits). ``consumed()``: the last
        consumed offsets. A partition not read from yet holds it back (its records may be
        repeats still to come; an empty one keeps the windows, as before)."""
        if not pending:
            self._backlog = False
            return False
        offsets = dict(consumed())
        lags = self.source.lag(offsets)
        if self._behind(lags):
            self._backlog = True
            return False
        return (
            self._backlog
            and self.source.assignment() <= offsets.keys()
            and not any(lags.values())
            and not budget_bound()
        )

    def pause(self) -> None:
        """Take no more records (the drain)."""
        self.source.pause()

    def partitions(self) -> tuple[int, int]:
        """This worker's partitions and all of its topics' (for its share of the budget)."""
        assigned = len(self.source.assignment())
        if assigned != self._assigned:
            self._assigned = assigned
            self._total = self.source.total_partitions() if assigned else 0
        return self._assigned, self._total

    def report_lag(self, consumed: Mapping[TopicPartition, int]) -> None:
        """Every ``LAG_INTERVAL``: records behind the log end, from the last consumed offsets."""
        now = self._clock.monotonic()
        if now - self._last_lag < LAG_INTERVAL:
            return
        self._last_lag = now
        for (topic, partition), lag in self.source.lag(dict(consumed)).items():
            metrics.CONSUMER_LAG.labels(topic, str(partition)).set(lag)

    def close(self, timeout: float) -> None:
        self.source.close(timeout=timeout)
