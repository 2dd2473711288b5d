"""Records in flight: a poll's records until their plans come, then those that still wait (how
many targets each waits for, what failed), and which offsets may be committed because every
record at or below them is finished (purged, skipped or dead-lettered). In a backlog most
records wait for nothing once planned (no rule fired, or an earlier purge covers them): they
never get a state of their own, and their poll's run finishes whole.

Not thread-safe: only the loop's thread touches it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from itertools import groupby
from operator import itemgetter
from typing import TYPE_CHECKING, Any, NamedTuple

import structlog

from worker.errors import PermanentError
from worker.events import Record, TopicPartition
from worker.outcome.offsets import OffsetTracker, Run

if TYPE_CHECKING:
    from worker.planning.planner import Routed

_log = structlog.get_logger("worker.outcome")
# A record's partition, as ``groupby`` keys a poll's records by it.
_partition_of: Callable[[Record], TopicPartition] = itemgetter(0, 1)


class Ref(NamedTuple):
    """A record's identity while in flight. ``seq`` (its run's, numbered as read) tells a record
    re-delivered after a rebalance from its earlier copy, so stale work never completes it."""

    topic: str
    partition: int
    offset: int
    seq: int

    @property
    def tp(self) -> TopicPartition:
        return (self.topic, self.partition)


@dataclass(slots=True)
class InFlight:
    """One record's state while in flight. It keeps the event's id and time, not the parsed
    event: tens of thousands of records wait in a backlog, and their bodies' dicts and lists
    would make every garbage collection walk them."""

    record: Record
    arrived: float = 0.0  # monotonic time it was taken from Kafka (the guard judges by it)
    event_id: str | None = None
    event_time: float | None = None
    remaining: int = 0
    # The one empty tuple until something fails: no list per record in a backlog.
    failures: Sequence[PermanentError] = ()
    skipped: bool = False
    # Its dead letter was counted by the guard (a write tried again is not counted twice).
    judged: bool = False
    # URLs to warm once the record is purged (rules with ``warm``).
    warm: list[Routed] | None = None

    @property
    def log(self) -> Any:
        """A logger bound to where the record came from (and its event id), made when asked:
        most records never log a line of their own."""
        r = self.record
        return _log.bind(
            topic=r.topic, partition=r.partition, offset=r.offset, event_id=self.event_id
        )


class Opened(NamedTuple):
    """A poll's records as tracked: per partition, its run of them (``records[lo:hi]``)."""

    records: Sequence[Record]
    runs: list[tuple[TopicPartition, Run, int, int]]
    arrived: float  # monotonic time they were taken from Kafka


class InFlightRecords:
    """Records from when they are read until they are finished. A poll's records are tracked
    by partition runs (``OffsetTracker``) until their plans come; only the records that then
    still wait for something (a purge, a dead letter) get a state of their own."""

    def __init__(self) -> None:
        self._records: dict[Ref, InFlight] = {}
        self._offsets = OffsetTracker()
        # Records ready to finish, with their states (``forget`` takes out those it drops).
        self._ready: list[tuple[Ref, InFlight]] = []
        self._seq = 0
        self._unplanned = 0  # records read whose plans have not been applied

    def __len__(self) -> int:
        return len(self._records) + self._unplanned

    def __contains__(self, ref: object) -> bool:
        return ref in self._records

    def open(
        self,
        records: Sequence[Record],
        arrived: float,
        rewound: Callable[[set[TopicPartition]], None],
    ) -> Opened:
        """Start tracking a poll's ``records`` (each partition's in offset order); none is
        committable until its plan is applied and it is finished. A partition read again from
        an earlier position (a rebalance, a reset) is handed to ``rewound`` to be forgotten
        first."""
        runs: list[tuple[TopicPartition, Run, int, int]] = []
        lo = 0
        for tp, group in groupby(records, key=_partition_of):
            offsets = [record.offset for record in group]
            hi = lo + len(offsets)
            self._seq += 1
            run = self._offsets.track(tp, offsets, self._seq)
            if run is None:
                rewound({tp})
                run = self._offsets.track(tp, offsets, self._seq)
                assert run is not None
            runs.append((tp, run, lo, hi))
            self._unplanned += hi - lo
            lo = hi
        return Opened(records, runs, arrived)

    def add(self, ref: Ref, record: Record, arrived: float) -> InFlight:
        """A state for a record of a run being planned that waits for something."""
        state = self._records[ref] = InFlight(record, arrived)
        return state

    def planned(self, tp: TopicPartition, run: Run, waiting: set[int]) -> None:
        """The plans of ``run`` are applied: ``waiting`` are the offsets of its records that
        got a state (``add``); the others are finished."""
        self._unplanned -= len(run.offsets)
        self._offsets.planned(tp, run, waiting)

    def get(self, ref: Hashable) -> InFlight | None:
        """``ref``'s state, if it is a record still in flight."""
        return self._records.get(ref) if isinstance(ref, Ref) else None

    def states(self, refs: Iterable[Hashable]) -> list[InFlight]:
        """The states of those of ``refs`` still in flight, in their order."""
        get = self._records.get
        return [state for ref in refs if (state := get(ref)) is not None]  # type: ignore[call-overload]

    def waits(self, ref: Ref, state: InFlight, waiting: int) -> None:
        """``ref`` (whose state is ``state``) waits for ``waiting`` more target outcomes: none,
        and it is ready to finish."""
        state.remaining += waiting
        if state.remaining == 0:
            self._ready.append((ref, state))

    def settle(self, ref: Ref, count: int, error: PermanentError | None = None) -> None:
        """``count`` of the record's targets ended (failed with ``error``, or done). Work for a
        record that is no longer tracked (revoked meanwhile) is ignored."""
        state = self._records.get(ref)
        if state is None:
            return
        if error is not None:
            state.failures = [*state.failures, error]
        state.remaining -= count
        if state.remaining == 0:
            self._ready.append((ref, state))

    def take_ready(self) -> list[tuple[Ref, InFlight]]:
        """Records whose every target has ended, oldest first; call ``finish`` or ``hold``."""
        ready, self._ready = self._ready, []
        return ready

    def hold(self, ref: Ref) -> None:
        """Not finished after all (its dead-letter write must wait): offer it again later."""
        self._ready.append((ref, self._records[ref]))

    def finish(self, ref: Ref) -> None:
        """The record is purged or confirmed on the dead-letter topic: its offset may commit."""
        del self._records[ref]
        self._offsets.complete((ref.topic, ref.partition), ref.offset)

    def forget(self, tps: set[TopicPartition]) -> tuple[set[Ref], int]:
        """Drop every record of ``tps`` (their new owner, or a re-read, redoes them). Returns
        those that had a state (work may be pending for them), and how many were dropped in
        all (with those not yet planned)."""
        unplanned = self._offsets.forget(tps)
        self._unplanned -= unplanned
        gone = {ref for ref in self._records if ref.tp in tps}
        for ref in gone:
            del self._records[ref]
        self._ready = [(ref, state) for ref, state in self._ready if ref not in gone]
        return gone, len(gone) + unplanned

    def to_commit(self) -> dict[TopicPartition, int]:
        return self._offsets.to_commit()

    def committable(self) -> dict[TopicPartition, int]:
        return self._offsets.committable()

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        self._offsets.mark_committed(offsets)

    def last_seen(self) -> dict[TopicPartition, int]:
        return self._offsets.last_seen()

    def last_planned(self) -> dict[TopicPartition, int]:
        return self._offsets.last_planned()
