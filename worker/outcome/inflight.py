"""Records in flight: how many targets each still waits for, what failed, and which offsets may
be committed because every record at or below them is finished (purged or dead-lettered).

Not thread-safe: only the loop's thread touches it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import structlog

from worker.errors import PermanentError
from worker.events import Record, TopicPartition
from worker.outcome.offsets import OffsetTracker

if TYPE_CHECKING:
    from worker.planning.planner import Routed

_log = structlog.get_logger("worker.outcome")


class Ref(NamedTuple):
    """A record's identity while in flight. ``seq`` (an ingest sequence number) tells a record
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


class InFlightRecords:
    def __init__(self) -> None:
        self._records: dict[Ref, InFlight] = {}
        self._offsets = OffsetTracker()
        # Records ready to finish, with their states (``forget`` takes out those it drops).
        self._ready: list[tuple[Ref, InFlight]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, ref: object) -> bool:
        return ref in self._records

    def open(self, record: Record, arrived: float = 0.0) -> Ref | None:
        """Start tracking ``record``; its offset is not committable until it is finished. None,
        tracking nothing, when the record is not past the last one taken from its partition:
        the partition is being read again (a rebalance, a reset) and must be forgotten first."""
        if not self._offsets.track((record.topic, record.partition), record.offset):
            return None
        self._seq += 1
        ref = Ref(record.topic, record.partition, record.offset, self._seq)
        self._records[ref] = InFlight(record, arrived)
        return ref

    def get(self, ref: Hashable) -> InFlight | None:
        """``ref``'s state, if it is a record still in flight."""
        return self._records.get(ref) if isinstance(ref, Ref) else None

    def states(self, refs: Iterable[Hashable]) -> list[InFlight]:
        """The states of those of ``refs`` still in flight, in their order."""
        get = self._records.get
        return [state for ref in refs if (state := get(ref)) is not None]  # type: ignore[call-overload]

    def planned(self, ref: Ref, state: InFlight, waiting: int) -> None:
        """Planning is over and ``ref`` (whose state is ``state``) waits for ``waiting`` target
        outcomes: none, and it is ready to finish."""
        state.remaining += waiting
        if state.remaining == 0:
            self._ready.append((ref, state))

    def skip(self, ref: Ref) -> None:
        """Planned, and no rule fired for it: ready to finish (ignored if no longer tracked)."""
        state = self._records.get(ref)
        if state is not None:
            state.skipped = True
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

    def forget(self, tps: set[TopicPartition]) -> set[Ref]:
        """Drop every record of ``tps`` (their new owner, or a re-read, redoes them)."""
        self._offsets.forget(tps)
        gone = {ref for ref in self._records if ref.tp in tps}
        for ref in gone:
            del self._records[ref]
        self._ready = [(ref, state) for ref, state in self._ready if ref not in gone]
        return gone

    def to_commit(self) -> dict[TopicPartition, int]:
        return self._offsets.to_commit()

    def committable(self) -> dict[TopicPartition, int]:
        return self._offsets.committable()

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        self._offsets.mark_committed(offsets)

    def last_seen(self) -> dict[TopicPartition, int]:
        return self._offsets.last_seen()
