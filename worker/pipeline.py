"""The worker's loop: records in, purges out, offsets committed only behind finished records.

One thread owns all state (coalescer, in-flight records, offsets); purge requests run on a small
pool and come back as futures. A record is finished when every target it produced was accepted
by the API or failed for good; a record with failures goes to the dead-letter topic first. Only
then does its offset become committable.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import structlog

from worker import metrics
from worker.clock import Clock
from worker.coalescer import Batch, Coalescer
from worker.config import Config
from worker.deadletter import DeadLetterGuard, DeadLetterSink, headers_for
from worker.errors import (
    DeadLetterGuardTripped,
    InvalidEvent,
    NoRuleMatched,
    PermanentError,
    RetriesExhausted,
    RetryableError,
    UnknownZone,
)
from worker.events import Event, Record, decode
from worker.offsets import OffsetTracker
from worker.purger import BatchResult, Purger
from worker.routing import ZoneRouter
from worker.source import Source
from worker.targets import Kind
from worker.wiring import Accounts

log = structlog.get_logger("worker.pipeline")

# A record's identity while in flight: topic, partition, offset, and an ingest sequence number,
# so work left over from before a rebalance can never complete a re-delivered copy of the record.
Ref = tuple[str, int, int, int]
LAG_INTERVAL = 5.0
DEAD_LETTER_RETRY = 2.0


@dataclass
class InFlight:
    record: Record
    event: Event | None = None
    remaining: int = 0
    failures: list[PermanentError] = field(default_factory=list)
    skipped: bool = False


@dataclass
class Status:
    """What the health endpoints and tests read; written only by the loop."""

    last_poll: float = 0.0
    last_record: float = 0.0
    assigned: int = 0
    running: bool = False


class Pipeline:
    def __init__(
        self,
        config: Config,
        source: Source,
        sink: DeadLetterSink,
        accounts: Accounts,
        clock: Clock,
        *,
        fixed_share: float | None = None,
    ) -> None:
        self.config = config
        self.source = source
        self.sink = sink
        self.accounts = accounts
        self.clock = clock
        self.router = ZoneRouter(config.zones)
        self._zones = {z.id: z for z in config.zones}
        self.coalescer = Coalescer(config.coalesce.window_seconds, self._cap, clock)
        self.offsets = OffsetTracker()
        self.purger = Purger(config.delivery.retry, clock, dry_run=config.delivery.dry_run)
        self.guard = DeadLetterGuard(config.delivery.guard, clock)
        self.pool = ThreadPoolExecutor(config.delivery.concurrency, thread_name_prefix="purge")
        self.inflight: dict[Ref, InFlight] = {}
        self.futures: dict[Future[BatchResult], Batch] = {}
        self.queued: deque[Batch] = deque()
        self.ready: list[Ref] = []
        self.status = Status()
        self.tripped = False
        self._seq = 0
        self._paused = False
        self._last_commit = 0.0
        self._last_lag = 0.0
        self._dead_letter_retry_at = 0.0
        self._share: float | None = None
        self._fixed_share = fixed_share
        if fixed_share is not None:
            self._set_share(fixed_share)

    def _cap(self, zone_id: str, kind: Kind) -> int:
        return self.accounts.cap(self._zones[zone_id], kind is Kind.FILES)

    # -- the loop ---------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Process until ``stop`` is set, then drain within the deadline and commit."""
        self.status.running = True
        try:
            while not stop.is_set():
                self.step()
        finally:
            self.drain()
            self.status.running = False

    def step(self) -> None:
        """One iteration: poll, route, flush, collect, finish, commit. Never blocks for long."""
        timeout = 0.05 if (self.futures or self.queued or self.coalescer.pending) else 0.5
        due = self.coalescer.next_due()
        if due is not None:
            timeout = max(0.0, min(timeout, due - self.clock.monotonic()))
        records = self.source.poll(timeout, self.config.kafka.max_poll_records)
        # A rebalance happens inside poll(): forget the revoked partitions before taking the
        # records this poll returned, which already belong to the new assignment.
        self._handle_revoked()
        now_wall = self.clock.time()
        self.status.last_poll = now_wall
        metrics.LAST_POLL_TIME.set(now_wall)
        for record in records:
            self._ingest(record)
        # Dispatches the new batches, and earlier ones whose rate budget has refilled since.
        self._submit(self.coalescer.due())
        self._collect(block=False)
        self._finish()
        self._backpressure()
        self._maybe_commit()
        self._update_share_and_lag()

    @property
    def idle(self) -> bool:
        """Nothing pending, in flight or waiting to be finished."""
        busy = self.inflight or self.futures or self.queued or self.coalescer.pending or self.ready
        return not busy

    def drain(self) -> None:
        """Stop taking records, purge what is pending, wait up to the deadline, commit, close."""
        deadline = self.clock.monotonic() + self.config.delivery.drain_deadline_seconds
        self.source.pause()
        self._submit(self.coalescer.flush_all())
        while (self.futures or self.queued) and self.clock.monotonic() < deadline:
            if not self.futures:
                self.clock.sleep(0.05)  # queued batches are waiting for rate budget
            self._collect(block=True, timeout=max(0.0, deadline - self.clock.monotonic()))
            self._finish()
        self._finish()
        self._commit()
        unfinished = len(self.inflight)
        if unfinished:
            log.warning(
                "drain deadline reached; unfinished records will be redelivered", records=unfinished
            )
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.source.close()
        self.sink.close()

    # -- records in -------------------------------------------------------------------------------

    def _ingest(self, record: Record) -> None:
        tp = (record.topic, record.partition)
        if not self.offsets.track(tp, record.offset):
            # The offset went backwards: the partition is being read again from an earlier
            # position (a rebalance, a reset). Start its bookkeeping over.
            self._forget({tp}, "partition rewound")
            self.offsets.track(tp, record.offset)
        self._seq += 1
        ref: Ref = (record.topic, record.partition, record.offset, self._seq)
        state = InFlight(record)
        self.inflight[ref] = state
        try:
            self._plan(ref, state)
        except PermanentError as exc:
            state.failures.append(exc)
        except Exception as exc:
            log.exception("unexpected error handling a record", **_where(record))
            state.failures.append(InvalidEvent(f"internal error: {type(exc).__name__}: {exc}"))
        log.debug(
            "record planned",
            targets=state.remaining,
            failures=len(state.failures),
            event_id=state.event.id if state.event else None,
            **_where(record),
        )
        if state.remaining == 0:
            self.ready.append(ref)

    def _plan(self, ref: Ref, state: InFlight) -> None:
        kafka = self.config.kafka
        event = decode(
            state.record, max_bytes=kafka.max_record_bytes, type_field=kafka.event_type_field
        )
        state.event = event
        plan = self.config.rules.evaluate(event)
        if not plan.fired:
            if self.config.delivery.no_rule_matched == "dead_letter":
                raise NoRuleMatched(f"no rule matched event type {event.type!r} on {event.topic}")
            state.skipped = True
            return
        for rt in plan.targets:
            try:
                zone = self.router.route(rt.target)
            except UnknownZone as exc:
                if self.config.delivery.unknown_zone == "drop":
                    log.warning(
                        "target dropped: unknown zone",
                        target=str(rt.target),
                        **_where(state.record),
                    )
                    continue
                state.failures.append(exc)
                continue
            for target in self.router.expand(zone, rt.target):
                metrics.targets_counter(target.kind.value).inc()
                state.remaining += 1
                self.coalescer.add(zone.id, rt.mode, target, ref)

    # -- purges out -------------------------------------------------------------------------------

    def _submit(self, batches: Iterable[Batch]) -> None:
        self.queued.extend(batches)
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand the pool only a couple of batches per thread, and only batches whose rate budget
        is there now: the rest wait here. A tag batch waiting minutes for the free plan's bucket
        must not hold a thread that URL batches could use, and a rebalance can still take back
        queued work of records that are no longer ours."""
        limit = 2 * self.config.delivery.concurrency
        if not self.queued or len(self.futures) >= limit:
            return
        waiting: deque[Batch] = deque()
        while self.queued and len(self.futures) < limit:
            batch = self.queued.popleft()
            dest = self.accounts.destinations[batch.zone_id]
            if not self.config.delivery.dry_run and dest.limiter.ready_in(
                batch.kind, len(batch.items)
            ):
                waiting.append(batch)
                continue
            future = self.pool.submit(self.purger.send, dest, batch.kind, batch.mode, batch.targets)
            self.futures[future] = batch
        waiting.extend(self.queued)
        self.queued = waiting

    def _collect(self, *, block: bool, timeout: float = 0.0) -> None:
        if block and self.futures:
            wait(list(self.futures), timeout=timeout, return_when=FIRST_COMPLETED)
        for future in [f for f in self.futures if f.done()]:
            batch = self.futures.pop(future)
            try:
                result = future.result()
            except Exception as exc:
                log.exception("purge batch crashed", zone=batch.zone_id, kind=batch.kind.value)
                result = BatchResult(failed=[(t, RetriesExhausted(exc, 1)) for t in batch.targets])
            self._apply(batch, result)
        self._dispatch()

    def _apply(self, batch: Batch, result: BatchResult) -> None:
        by_target = {p.target: p for p in batch.items}
        errors: dict[object, PermanentError] = dict(result.failed)
        for target, pending in by_target.items():
            error = errors.get(target)
            for owner, count in pending.owners.items():
                state = self.inflight.get(owner)  # type: ignore[call-overload]
                if state is None:
                    continue  # revoked meanwhile
                if error is not None:
                    state.failures.append(error)
                state.remaining -= count
                if state.remaining == 0:
                    self.ready.append(owner)  # type: ignore[arg-type]

    # -- records out ------------------------------------------------------------------------------

    def _finish(self) -> None:
        if not self.ready:
            return
        now = self.clock.monotonic()
        waiting: list[Ref] = []
        for ref in self.ready:
            state = self.inflight.get(ref)
            if state is None:
                continue
            if state.failures:
                if self.tripped or now < self._dead_letter_retry_at:
                    waiting.append(ref)
                    continue
                try:
                    self._dead_letter(ref, state)
                except RetryableError as exc:
                    log.warning(
                        "dead-letter write failed; will retry",
                        error=str(exc),
                        **_where(state.record),
                    )
                    self._dead_letter_retry_at = now + DEAD_LETTER_RETRY
                    waiting.append(ref)
                    continue
            else:
                self.guard.record_ok()
                outcome = "skipped" if state.skipped else "purged"
                metrics.RECORDS.labels(ref[0], outcome).inc()
                if not state.skipped and state.event is not None and state.event.time:
                    metrics.EVENT_AGE.observe(max(0.0, self.clock.time() - state.event.time))
            del self.inflight[ref]
            self.offsets.complete((ref[0], ref[1]), ref[2])
            self.status.last_record = self.clock.time()
            metrics.LAST_RECORD_TIME.set(self.status.last_record)
        self.ready = waiting
        metrics.PENDING_RECORDS.set(len(self.inflight))

    def _dead_letter(self, ref: Ref, state: InFlight) -> None:
        try:
            self.guard.check()
        except DeadLetterGuardTripped:
            # No more dead letters from here on: the draining that follows only commits what
            # finished cleanly, and the unfinished records wait on Kafka for a fixed deploy.
            self.tripped = True
            raise
        record = state.record
        headers = headers_for(
            record,
            state.failures,
            failed_at=self.clock.time(),
            attempts=record.attempts + 1,
            original=record.origin,
        )
        self.sink.write(state.record, headers)
        self.guard.record_dead()
        first = state.failures[0]
        metrics.DEAD_LETTERS.labels(first.error_class).inc()
        metrics.RECORDS.labels(ref[0], "dead_lettered").inc()
        log.warning(
            "record dead-lettered",
            error_class=first.error_class,
            error=str(first),
            event_id=state.event.id if state.event else None,
            **_where(state.record),
        )

    # -- flow control and commits -----------------------------------------------------------------

    def _backpressure(self) -> None:
        pending = self.coalescer.pending + sum(len(b.items) for b in self.queued)
        records = len(self.inflight)
        metrics.PENDING_TARGETS.set(pending)
        cfg = self.config.coalesce
        over = pending >= cfg.max_pending_targets or records >= cfg.max_pending_records
        under = pending < cfg.max_pending_targets * 0.8 and records < cfg.max_pending_records * 0.8
        if over and not self._paused:
            self.source.pause()
            self._paused = True
            metrics.PAUSED.set(1)
            log.info(
                "consumption paused: backlog", pending_targets=pending, pending_records=records
            )
            # A full backlog will not drain by waiting for the window: send what is pending.
            self._submit(self.coalescer.flush_all())
        elif self._paused and under:
            self.source.resume()
            self._paused = False
            metrics.PAUSED.set(0)
            log.info("consumption resumed", pending_targets=pending, pending_records=records)

    def _maybe_commit(self) -> None:
        now = self.clock.monotonic()
        if now - self._last_commit >= self.config.delivery.commit_interval_seconds:
            self._commit()
            self._last_commit = now

    def _commit(self) -> None:
        offsets = self.offsets.to_commit()
        if offsets and self.source.commit(offsets):
            self.offsets.mark_committed(offsets)

    def _handle_revoked(self) -> None:
        revoked = self.source.take_revoked()
        if revoked:
            self._forget(revoked, "partitions revoked")
            self._share = None  # recompute after the new assignment

    def _forget(self, tps: set[tuple[str, int]], why: str) -> None:
        """Drop all state of records from ``tps``: their new owner (or re-read) redoes them."""
        self.offsets.forget(tps)
        gone = {ref for ref in self.inflight if (ref[0], ref[1]) in tps}
        for ref in gone:
            del self.inflight[ref]
        # Their pending targets would only spend the budget on work that is done again anyway.
        dropped = self.coalescer.discard(lambda owner: owner in gone)
        for batch in self.queued:
            for item in batch.items:
                item.owners = {o: c for o, c in item.owners.items() if o not in gone}
            before = len(batch.items)
            batch.items = [item for item in batch.items if item.owners]
            dropped += before - len(batch.items)
        self.queued = deque(b for b in self.queued if b.items)
        self.ready = [ref for ref in self.ready if ref not in gone]
        log.info(
            why,
            partitions=sorted(f"{t}[{p}]" for t, p in tps),
            dropped_records=len(gone),
            dropped_targets=dropped,
        )

    def _update_share_and_lag(self) -> None:
        """Spend only this replica's share of each account's budget: Cloudflare meters per
        account, so N replicas with full budgets would overrun it N-fold. The share is this
        replica's part of the partitions, recomputed whenever the assignment changes."""
        assigned = self.source.assignment()
        changed = len(assigned) != self.status.assigned
        self.status.assigned = len(assigned)
        if assigned and (self._share is None or changed) and self._fixed_share is None:
            partitions = self.source.total_partitions()
            self._set_share(len(assigned) / partitions if partitions else None)
        now = self.clock.monotonic()
        if now - self._last_lag >= LAG_INTERVAL:
            self._last_lag = now
            for (topic, partition), lag in self.source.lag(self.offsets.last_seen()).items():
                metrics.CONSUMER_LAG.labels(topic, str(partition)).set(lag)

    def _set_share(self, share: float | None) -> None:
        if share is None or (self._share is not None and abs(share - self._share) < 0.01):
            return
        self._share = share
        self.accounts.set_share(share)
        for name in self.accounts.limiters:
            metrics.BUDGET_SHARE.labels(name).set(share)
        log.info("rate budget share", share=round(share, 3), partitions=self.status.assigned)


def _where(record: Record) -> dict[str, object]:
    return {"topic": record.topic, "partition": record.partition, "offset": record.offset}
