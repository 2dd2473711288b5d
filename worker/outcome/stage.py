"""The outcome stage: a record is in flight until every target it produced has ended, then it is
finished: a purged one at once, a failed one once its dead letter is confirmed. Offsets are
committed only behind finished records (``CommitPolicy``).

The dead-letter guard is asked before each dead letter; a record whose dead letter cannot be
written yet is held and offered again after a pause. Warming starts once a record is purged
and never holds it back. Not thread-safe: only the loop's thread touches it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence, Set
from dataclasses import dataclass, field

import structlog

from worker.clock import Clock
from worker.errors import DeadLetterGuardTripped
from worker.events import Record, TopicPartition
from worker.observe import metrics
from worker.outcome.commit import CommitPolicy
from worker.outcome.dead_letters import DeadLetterSink, DeadLetterWrite, headers_for
from worker.outcome.guard import HEADER as GUARD_HEADER
from worker.outcome.guard import DeadLetterGuard
from worker.outcome.inflight import InFlight, InFlightRecords, Opened, Ref
from worker.outcome.receipts import Receipts
from worker.outcome.warming import Warmer
from worker.planning.planner import SKIPPED, Planned
from worker.sending.stage import Ended, Purged

log = structlog.get_logger("worker.outcome")

# A dead-letter write that failed is tried again after this pause.
DEAD_LETTER_RETRY = 2.0
# Of a run of plans (``plans[lo:hi]``), the positions of the records that wait for something,
# how many were skipped and how many already purged (their ages as of ``now`` appended):
# ``PendingTargets.sift``.
Sift = Callable[[Sequence[Planned], int, int, float, list[float]], tuple[list[int], int, int]]


@dataclass(eq=False)
class Outcome:
    """Records in flight, their dead letters (asked of the guard first), and their commits."""

    records: InFlightRecords
    commits: CommitPolicy
    sink: DeadLetterSink
    guard: DeadLetterGuard
    clock: Clock
    warmer: Warmer | None = None
    receipts: Receipts | None = None
    debug: bool = False
    tripped: bool = field(init=False, default=False)
    last_record: float = field(init=False, default=0.0)  # wall-clock time of the last finish
    # The last dead-letter write failed and none has succeeded since: records wait, uncommitted,
    # and the worker is not ready (``/readyz``) until one goes through.
    writes_failing: bool = field(init=False, default=False)
    _retry_at: float = field(init=False, default=0.0)
    # Dead-letter writes under way: their records finish once the broker confirms.
    _writes: dict[Ref, tuple[InFlight, DeadLetterWrite]] = field(init=False, default_factory=dict)

    @property
    def writing(self) -> int:
        """Dead-letter writes not yet confirmed."""
        return len(self._writes)

    def open(
        self, records: Sequence[Record], rewound: Callable[[set[TopicPartition]], None]
    ) -> Opened:
        """Track a poll's ``records`` until each is finished (the guard counts them as arrived
        now). A partition being read again from an earlier position is handed to ``rewound``
        to be forgotten first."""
        now = self.clock.monotonic()
        self.guard.arrived(len(records), now)
        return self.records.open(records, now, rewound)

    def planned(
        self,
        opened: Opened,
        plans: Sequence[Planned],
        sift: Sift,
        pend: Callable[[Ref, Planned], int],
    ) -> None:
        """The plans of ``opened``'s records, in their order. A record no rule fired for, or
        whose every target is already purged, is finished here (``sift`` tells them); the
        others get a state and their targets are handed to ``pend``, which says how many they
        wait for. Runs of partitions forgotten meanwhile are passed over."""
        records, add, waits = self.records, self.records.add, self.records.waits
        now_wall = self.clock.time()
        ages: list[float] = []
        finished: Counter[tuple[str, str]] = Counter()
        for tp, run, lo, hi in opened.runs:
            if not run.alive:
                continue
            if self.debug:  # debug logs each record's plan, from its state
                rest = [i for i in range(lo, hi) if plans[i] is not SKIPPED]
                skipped, purged = hi - lo - len(rest), 0
            else:
                rest, skipped, purged = sift(plans, lo, hi, now_wall, ages)
            waiting: set[int] = set()
            for i in rest:
                plan, record = plans[i], opened.records[i]
                ref = Ref(tp[0], tp[1], record.offset, run.seq)
                state = add(ref, record, opened.arrived)
                waits(ref, state, self._planned(state, plan, pend(ref, plan)))
                waiting.add(record.offset)
            records.planned(tp, run, waiting)
            finished[(tp[0], "skipped")] += skipped
            finished[(tp[0], "purged")] += purged
            if skipped + purged:
                self.last_record = now_wall
        metrics.EVENT_AGE.observe_all(ages)
        for (topic, outcome), n in finished.items():
            if n:
                metrics.child(metrics.RECORDS, topic, outcome).inc(n)
        metrics.LAST_RECORD_TIME.set(self.last_record)

    def _planned(self, state: InFlight, plan: Planned, waiting: int) -> int:
        """Keep of ``plan`` what ``state``'s record needs until it is finished; returns
        ``waiting``, the target outcomes it waits for."""
        state.event_id, state.event_time = plan.event_id, plan.event_time
        state.skipped = plan.skipped
        if plan.errors:
            state.failures = [*state.failures, *plan.errors]
        if plan.warm and self.warmer is not None:
            state.warm = list(plan.warm)
        for dropped in plan.dropped:
            state.log.warning("target dropped: unknown zone", error=str(dropped))
        if self.debug:  # builds nothing per record unless asked for
            state.log.debug("record planned", targets=len(plan.targets), failures=len(plan.errors))
        return waiting

    def settle(self, ended: Iterable[Ended], purged: Iterable[Purged] = ()) -> None:
        """Targets whose requests ended: each owner's share of them is done (or failed);
        ``purged``: the accepted requests among them, for their receipts."""
        if self.receipts is not None:
            self.receipts.purged(purged, self.records)
        settle = self.records.settle
        for owners, error in ended:
            if error is None:
                for owner in owners:
                    settle(owner, 1)  # type: ignore[arg-type]
                continue
            # One failure per record, however many of its targets the item stood for.
            for owner, count in Counter(owners).items():
                settle(owner, count, error)  # type: ignore[arg-type]

    def finish(self, *, final: bool = False) -> None:
        """Finish every ready record: purged ones at once, failed ones by starting their
        dead-letter write (``final``: none is started, the worker is stopping); finish those
        whose write was confirmed. Raises ``DeadLetterGuardTripped``."""
        self._confirm()
        ready = self.records.take_ready()
        if ready:
            self._finish(ready, final)
        self.commits.offer()

    def _finish(self, ready: list[tuple[Ref, InFlight]], final: bool) -> None:
        now, now_wall = self.clock.monotonic(), self.clock.time()
        finished: dict[tuple[str, str], int] = {}
        ages: list[float] = []
        for ref, state in ready:
            if state.failures:
                if self.tripped or final or now < self._retry_at:
                    self.records.hold(ref)
                else:
                    self._dead_letter(ref, state)
                continue
            outcome = "skipped" if state.skipped else "purged"
            finished[(ref.topic, outcome)] = finished.get((ref.topic, outcome), 0) + 1
            if not state.skipped and state.event_time:
                ages.append(now_wall - state.event_time)
            if state.warm and self.warmer is not None:
                self.warmer.submit(state.warm)  # never blocks, never fails the record
            self.records.finish(ref)
            self.last_record = now_wall
        metrics.EVENT_AGE.observe_all(ages)
        for (topic, outcome), n in finished.items():
            metrics.child(metrics.RECORDS, topic, outcome).inc(n)
        metrics.LAST_RECORD_TIME.set(self.last_record)

    def _dead_letter(self, ref: Ref, state: InFlight) -> None:
        if not state.judged:
            try:
                self.guard.check(state.arrived)
            except DeadLetterGuardTripped:
                # No more dead letters from here on: the draining that follows only commits
                # what finished cleanly; the unfinished records wait on Kafka for a fix.
                self.tripped = True
                raise
            # Counted as dead-lettered now, so the guard sees writes still under way; once,
            # however often its write is tried.
            self.guard.dead(state.arrived)
            state.judged = True
        record = state.record
        headers = headers_for(
            record,
            state.failures,
            failed_at=self.clock.time(),
            attempts=record.attempts + 1,
            original=record.origin,
            extra={GUARD_HEADER: self.guard.header()},
        )
        self._writes[ref] = (state, self.sink.submit(record, headers))

    def _confirm(self) -> None:
        """Finish the records whose dead-letter write the broker confirmed; offer the others
        again after a pause. Never waits."""
        if not self._writes:
            return
        for ref, (state, write) in list(self._writes.items()):
            if not write.done():
                continue
            del self._writes[ref]
            if ref not in self.records:
                continue  # its partition was revoked meanwhile: the new owner redoes it
            error = write.error()
            self.writes_failing = error is not None
            if error is not None:
                state.log.warning("dead-letter write failed; will retry", error=str(error))
                self._retry_at = self.clock.monotonic() + DEAD_LETTER_RETRY
                self.records.hold(ref)
                continue
            first = state.failures[0]
            metrics.DEAD_LETTERS.labels(first.error_class).inc()
            metrics.child(metrics.RECORDS, ref.topic, "dead_lettered").inc()
            state.log.warning(
                "record dead-lettered", error_class=first.error_class, error=str(first)
            )
            if self.receipts is not None:
                self.receipts.dead_lettered(state, first, self.clock.time())
            self.records.finish(ref)
            self.last_record = self.clock.time()

    def forget(self, tps: Set[TopicPartition]) -> tuple[set[Ref], int]:
        """Drop every record of ``tps`` (their new owner, or a re-read, redoes them); returns
        those that had a state, and how many records were dropped in all."""
        return self.records.forget(set(tps))

    def receipts_written(self) -> bool:
        """The receipts of what ended so far are on the topic (or given up): a next owner that
        reads a record again learns from them that it was purged."""
        return self.receipts is None or self.receipts.written()

    def close(self, timeout: float) -> None:
        self.sink.close(timeout=timeout)
        if self.receipts is not None:
            self.receipts.close(timeout)
