"""The worker's loop: records in, purges out, offsets committed only behind finished records.

One thread owns all state. Each step polls, plans every record (``plan``), lets the purge ledger
finish targets an earlier purge already covers, adds the rest to the pending set (``coalescer``),
has the ``dispatcher`` send what the budget allows, settles what came back, finishes records
(dead-lettering those with failures) and commits. A record is finished when every target it
produced was accepted by the API, already covered, or failed for good; only then does its
offset become committable.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import structlog

from worker.clock import Clock
from worker.config import Config
from worker.errors import DeadLetterGuardTripped, PermanentError
from worker.events import Record
from worker.kafka.consumer import Source
from worker.observe import metrics
from worker.outcome.dead_letters import (
    DeadLetterGuard,
    DeadLetterSink,
    DeadLetterWrite,
    headers_for,
)
from worker.outcome.inflight import InFlight, InFlightRecords, Ref
from worker.outcome.warming import Warmer
from worker.pending.coalescer import Batch, Coalescer, Pending
from worker.pending.ledger import COVERED, PurgeLedger
from worker.planning.planner import Planned, Planner
from worker.planning.process import PlannerDied, PlannerProcess
from worker.runtime import tune_gc
from worker.sending.accounts import Accounts
from worker.sending.dispatcher import Dispatcher
from worker.sending.purger import BatchResult, Purger
from worker.sending.shares import Exchange, ShareKeeper
from worker.targets import Kind

log = structlog.get_logger("worker.loop")

LAG_INTERVAL = 5.0
DEAD_LETTER_RETRY = 2.0
BUSY_POLL = 0.05
IDLE_POLL = 0.5
# A commit waits no longer than an idle poll; one that fails is tried again after a pause, so a
# broker outage costs the loop a little time per few seconds, not a blocked loop.
COMMIT_WAIT = 0.5
COMMIT_RETRY = 5.0
# After the drain deadline: the last commit and closing the clients, within the +2 s allowed.
FINAL_COMMIT_WAIT = 1.0
CLOSE_WAIT = 0.4
# While the group rebalances, the worker sends nothing new (for at most HANDOVER_HOLD seconds):
# those targets may be another worker's in a moment. The revocation itself lets the requests
# in flight end and commits their records (see ``Pipeline._settle_for_handover``).
HANDOVER_HOLD = 5.0
# A poll's batch at least this large is planned in the planning process while the loop goes on.
OVERLAP_BATCH = 100


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
        exchange: Exchange | None = None,
        warmer: Warmer | None = None,
        remote: PlannerProcess | None = None,
    ) -> None:
        self.config = config
        self.source = source
        self.sink = sink
        self.accounts = accounts
        self.clock = clock
        self.planner = Planner(config)
        # Planning in a second process (see ``worker.planning.process``): the batches sent there and
        # not yet planned, oldest first, as their records' refs.
        self.remote = remote
        self._unplanned: deque[list[Ref]] = deque()
        self.coalescer = Coalescer(config.coalesce.window_seconds, accounts.cap, clock)
        self.ledger = PurgeLedger(config.coalesce.ledger)
        self.records = InFlightRecords()
        self.dispatcher = Dispatcher(
            self.coalescer,
            accounts.destinations,
            Purger(config.delivery.retry, clock, dry_run=config.delivery.dry_run),
            self.ledger,
            clock,
            cap=accounts.cap,
            concurrency=config.delivery.concurrency,
            dry_run=config.delivery.dry_run,
        )
        self.guard = DeadLetterGuard(config.delivery.dead_letter_guard, clock)
        self.status = Status()
        self.tripped = False
        self._use_event_time = config.coalesce.ledger.event_time == "event"
        self._debug = config.log_level == "debug"
        self._tally: dict[tuple[Kind, str], int] = {}
        self._paused = False
        self._last_commit = 0.0
        self._last_lag = 0.0
        self._dead_letter_retry_at = 0.0
        self._commit_retry_at = 0.0
        # Dead-letter writes under way: their records finish once the broker confirms.
        self._dead_writes: dict[Ref, tuple[InFlight, DeadLetterWrite]] = {}
        self.shares = ShareKeeper(accounts, clock, exchange=exchange, fixed=fixed_share)
        self.warmer = warmer
        self._total_partitions = 0
        self._rebalance_seen: float | None = None
        # Held by the loop except while it waits inside ``poll``: a revocation (which kafka-python
        # runs on its own thread while ``poll`` waits) settles records only while it holds it.
        self._lock = threading.Lock()
        self._draining = False
        source.on_revoke(self._settle_for_handover)

    # -- the loop ---------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Process until ``stop`` is set, then drain within the deadline and commit."""
        tune_gc()
        self.status.running = True
        try:
            while not stop.is_set():
                self.step()
        finally:
            self.drain()
            self.status.running = False

    def step(self) -> None:
        """One iteration: poll, plan, dispatch, settle, finish, commit. Never blocks for long."""
        with self._lock:
            holding = self._holding()
            # While holding, the poll itself is the point (it completes the rejoin): a zero
            # timeout, as a budget already due would give, lets it return before the group
            # answers.
            timeout = BUSY_POLL if holding else self._poll_timeout()
        records = self.source.poll(timeout, self.config.kafka.max_poll_records)
        with self._lock:
            self._after_poll(records, holding)

    def _after_poll(self, records: list[Record], holding: bool) -> None:
        # A rebalance happens inside poll(): forget the revoked partitions before taking the
        # records this poll returned, which already belong to the new assignment.
        self._handle_revoked()
        now_wall = self.clock.time()
        self.status.last_poll = now_wall
        metrics.LAST_POLL_TIME.set(now_wall)
        self._ingest(records)
        self._flush_tally()
        self._send_and_settle(send=not holding)
        self._confirm_dead_letters()
        self._finish()
        self._backpressure()
        if not holding:  # the revocation commits; the group refuses other commits meanwhile
            self._maybe_commit()
        self._update_share_and_lag()

    @property
    def pending_records(self) -> int:
        """Records taken from Kafka and not yet finished."""
        return len(self.records)

    @property
    def idle(self) -> bool:
        """Nothing pending, in flight or waiting to be finished."""
        return not (
            len(self.records)
            or self._unplanned
            or self.dispatcher.in_flight
            or self.coalescer.pending
        )

    def drain(self, deadline_seconds: float | None = None) -> None:
        """Stop taking records, purge what is pending within the deadline, commit, close.

        Returns within the deadline plus about ``FINAL_COMMIT_WAIT + 2 * CLOSE_WAIT`` whatever
        is going on: purges still retrying or waiting for budget are abandoned and their
        records, like every unfinished one, are left uncommitted for redelivery."""
        if deadline_seconds is None:
            deadline_seconds = self.config.delivery.drain_deadline_seconds
        deadline = self.clock.monotonic() + deadline_seconds
        self._draining = True  # from here the loop runs without its lock: the hook keeps out
        self.source.pause()
        if self.remote is not None:
            # Records read are purged like the others, if the planning process still answers.
            try:
                while self._unplanned and self.remote.alive:
                    self._take_plans()
            except PlannerDied as exc:
                log.error("unplanned records will be redelivered", error=str(exc))
            self.remote.close()
        while (self.coalescer.pending or self.dispatcher.in_flight or self._dead_writes) and (
            remaining := deadline - self.clock.monotonic()
        ) > 0:
            self.dispatcher.dispatch(drain=True)
            self._settle(self.dispatcher.collect(timeout=min(remaining, BUSY_POLL)))
            self._update_share_and_lag()  # the split moves on while this worker drains
            self._confirm_dead_letters()
            self._finish()
        self.dispatcher.close()
        self.shares.close(CLOSE_WAIT)
        self._confirm_dead_letters()
        self._finish(final=True)
        self.commit(wait=FINAL_COMMIT_WAIT)
        if self.records:
            log.warning(
                "drain deadline reached; unfinished records will be redelivered",
                records=len(self.records),
            )
        self.source.close(timeout=CLOSE_WAIT)
        self.sink.close(timeout=CLOSE_WAIT)

    def commit(self, wait: float = COMMIT_WAIT) -> None:
        """Commit every offset below which all records are finished, waiting at most ``wait``
        seconds for the broker."""
        offsets = self.records.to_commit()
        if not offsets:
            return
        if self.source.commit(offsets, timeout=wait):
            self.records.mark_committed(offsets)
        else:
            self._commit_retry_at = self.clock.monotonic() + COMMIT_RETRY

    def _poll_timeout(self) -> float:
        if self._unplanned:
            return 0.0  # plans are on their way: take what Kafka has, then them
        busy = self.records or self.dispatcher.in_flight or self.coalescer.pending
        timeout = BUSY_POLL if busy else IDLE_POLL
        now = self.clock.monotonic()
        for at in (self.coalescer.next_due(), self.dispatcher.budget_at):
            if at is not None:
                timeout = max(0.0, min(timeout, at - now))
        change = self.shares.next_change()  # shares move on wall-clock boundaries
        if change is not None:
            timeout = max(0.0, min(timeout, change - self.clock.time()))
        return timeout

    # -- records in -------------------------------------------------------------------------------

    def _ingest(self, records: list[Record]) -> None:
        """Track every record (its offset commits only once it is finished) and plan it: here,
        or in the planning process. There, a large batch is left to be planned while the loop
        goes on (a backlog: the two run side by side); the batch before it, and any small one,
        is taken at once (a trickle waits no longer than the child takes)."""
        refs = [self._open(record) for record in records]
        if self.remote is None:
            for ref, record in zip(refs, records, strict=True):
                self._planned(ref, Planned.of(self.planner.plan(record), self._use_event_time))
            return
        if records:
            self.remote.submit(records)
            self._unplanned.append(refs)
        keep = 1 if len(records) >= OVERLAP_BATCH else 0
        while len(self._unplanned) > keep:
            self._take_plans()

    def _take_plans(self) -> None:
        """The plans of the oldest batch in the planning process (waits for them)."""
        assert self.remote is not None
        refs = self._unplanned.popleft()
        for ref, plan in zip(refs, self.remote.collect(), strict=True):
            if ref in self.records:  # else its partition was revoked or rewound meanwhile
                self._planned(ref, plan)

    def _open(self, record: Record) -> Ref:
        ref = self.records.open(record)
        if ref is None:
            # The partition is being read again from an earlier position (a rebalance, a
            # reset): start its bookkeeping over.
            self._forget({(record.topic, record.partition)}, "partition rewound")
            ref = self.records.open(record)
            assert ref is not None
        return ref

    def _planned(self, ref: Ref, plan: Planned) -> None:
        state = self.records.state(ref)
        state.event_id, state.event_time = plan.event_id, plan.event_time
        state.skipped = plan.skipped
        if plan.errors:
            state.failures.extend(plan.errors)
        if plan.warm and self.warmer is not None:
            state.warm = list(plan.warm)
        if plan.dropped:
            for dropped in plan.dropped:
                state.log.warning("target dropped: unknown zone", error=str(dropped))
        self._enqueue(ref, plan)
        if self._debug:  # builds nothing per record unless asked for
            state.log.debug("record planned", targets=len(plan.targets), failures=len(plan.errors))
        self.records.planned(ref)

    def _enqueue(self, ref: Ref, plan: Planned) -> None:
        """Each target: already purged (done), joining a purge in flight, or pending."""
        event_time = plan.ledger_time
        check, add, tally = self.ledger.check, self.coalescer.add, self._tally
        waiting = 0
        for zone, mode, target in plan.targets:
            verdict = check(zone.id, mode, target, event_time)
            if verdict is COVERED:
                how = "sent"
            else:
                waiting += 1
                if isinstance(verdict, Pending):
                    verdict.owners[ref] = verdict.owners.get(ref, 0) + 1
                    how = "in_flight"
                else:
                    add(zone.id, mode, target, ref)
                    how = ""
            key = (target.kind, how)
            tally[key] = tally.get(key, 0) + 1
        if waiting:
            self.records.expect(ref, waiting)

    def _flush_tally(self) -> None:
        """Counters are added up per step, not per target: the loop handles thousands a second."""
        for (kind, how), n in self._tally.items():
            metrics.child(metrics.TARGETS, kind.value).inc(n)
            if how:
                metrics.child(metrics.TARGETS_ALREADY_PURGED, kind.value, how).inc(n)
        self._tally.clear()

    # -- purges out -------------------------------------------------------------------------------

    def _send_and_settle(self, *, send: bool = True) -> None:
        if send:
            self.dispatcher.dispatch()
        done = self.dispatcher.collect()
        if done:
            self._settle(done)
            if send:
                self.dispatcher.dispatch()  # threads just freed

    def _holding(self) -> bool:
        """True while the group rebalances (up to ``HANDOVER_HOLD``): nothing new is sent."""
        if not self.source.rebalance_pending():
            self._rebalance_seen = None
            return False
        now = self.clock.monotonic()
        if self._rebalance_seen is None:
            self._rebalance_seen = now
            log.info("group rebalancing: no new requests until it is over")
        return now - self._rebalance_seen < HANDOVER_HOLD

    def _settle_for_handover(self) -> bool:
        """The revocation's hook (on the Kafka client's thread, while the loop waits in
        ``poll``): settle the requests that ended and finish their records, so the revocation
        commits them. True once nothing is in flight, or when the loop is not parked in ``poll``
        (then nothing here may touch its state, and the revocation commits what is finished)."""
        if self._draining or not self._lock.acquire(blocking=False):
            return True
        try:
            self._settle(self.dispatcher.collect())
            self._confirm_dead_letters()
            self._finish()
            return not self.dispatcher.in_flight
        finally:
            self._lock.release()

    def _settle(self, done: list[tuple[Batch, BatchResult]]) -> None:
        for batch, result in done:
            errors: dict[object, PermanentError] = dict(result.failed)
            for item in batch.items:
                error = errors.get(item.target)
                for owner, count in item.owners.items():
                    self.records.settle(owner, count, error)  # type: ignore[arg-type]
        metrics.LEDGER_ENTRIES.set(len(self.ledger))

    # -- records out ------------------------------------------------------------------------------

    def _finish(self, final: bool = False) -> None:
        """Finish every ready record: purged ones at once, failed ones by starting their
        dead-letter write (``final``: none are started, the worker is stopping)."""
        ready = self.records.take_ready()
        if not ready:
            return
        now, now_wall = self.clock.monotonic(), self.clock.time()
        finished: dict[tuple[str, str], int] = {}
        for ref, state in ready:
            if state.failures:
                if self.tripped or final or now < self._dead_letter_retry_at:
                    self.records.hold(ref)
                else:
                    self._dead_letter(ref, state)
                continue
            self.guard.record_ok()
            outcome = "skipped" if state.skipped else "purged"
            finished[(ref.topic, outcome)] = finished.get((ref.topic, outcome), 0) + 1
            if not state.skipped and state.event_time:
                metrics.EVENT_AGE.observe(max(0.0, now_wall - state.event_time))
            if state.warm and self.warmer is not None:
                self.warmer.submit(state.warm)  # never blocks, never fails the record
            self.records.finish(ref)
            self.status.last_record = now_wall
        for (topic, outcome), n in finished.items():
            metrics.child(metrics.RECORDS, topic, outcome).inc(n)
        # What a rebalance may commit before the partitions change hands.
        self.source.finished(self.records.committable())
        metrics.LAST_RECORD_TIME.set(self.status.last_record)

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
        # Counted as dead-lettered now, so the guard sees writes still under way.
        self.guard.record_dead()
        self._dead_writes[ref] = (state, self.sink.submit(state.record, headers))

    def _confirm_dead_letters(self) -> None:
        """Finish the records whose dead-letter write the broker confirmed; offer the others
        again after a pause. Never waits."""
        if not self._dead_writes:
            return
        now = self.clock.monotonic()
        for ref, (state, write) in list(self._dead_writes.items()):
            if not write.done():
                continue
            del self._dead_writes[ref]
            if ref not in self.records:
                continue  # its partition was revoked meanwhile: the new owner redoes it
            error = write.error()
            if error is not None:
                state.log.warning("dead-letter write failed; will retry", error=str(error))
                self._dead_letter_retry_at = now + DEAD_LETTER_RETRY
                self.records.hold(ref)
                continue
            first = state.failures[0]
            metrics.DEAD_LETTERS.labels(first.error_class).inc()
            metrics.child(metrics.RECORDS, ref.topic, "dead_lettered").inc()
            state.log.warning(
                "record dead-lettered", error_class=first.error_class, error=str(first)
            )
            self.records.finish(ref)
            self.status.last_record = self.clock.time()
        self.source.finished(self.records.committable())

    # -- flow control and commits -----------------------------------------------------------------

    def _backpressure(self) -> None:
        pending = self.coalescer.pending
        records = len(self.records)
        metrics.PENDING_TARGETS.set(pending)
        metrics.PENDING_RECORDS.set(records)
        cfg = self.config.coalesce
        over = pending >= cfg.max_pending_targets or records >= cfg.max_pending_records
        under = pending < cfg.max_pending_targets * 0.8 and records < cfg.max_pending_records * 0.8
        if over and not self._paused:
            # The pending set keeps going out as fast as the budget allows meanwhile.
            self.source.pause()
            self._paused = True
            metrics.PAUSED.set(1)
            log.info(
                "consumption paused: backlog", pending_targets=pending, pending_records=records
            )
        elif self._paused and under:
            self.source.resume()
            self._paused = False
            metrics.PAUSED.set(0)
            log.info("consumption resumed", pending_targets=pending, pending_records=records)

    def _maybe_commit(self) -> None:
        now = self.clock.monotonic()
        if now < self._commit_retry_at:
            return
        if now - self._last_commit >= self.config.delivery.commit_interval_seconds:
            self.commit()
            self._last_commit = now

    def _handle_revoked(self) -> None:
        revoked = self.source.take_revoked()
        if revoked:
            self._forget(revoked, "partitions revoked")

    def _forget(self, tps: set[tuple[str, int]], why: str) -> None:
        """Drop all state of records from ``tps``: their new owner (or re-read) redoes them."""
        gone = self.records.forget(tps)
        # Their pending targets would only spend the budget on work that is done again anyway.
        dropped = self.coalescer.discard(lambda owner: owner in gone)
        log.info(
            why,
            partitions=sorted(f"{t}[{p}]" for t, p in tps),
            dropped_records=len(gone),
            dropped_targets=dropped,
        )

    def _update_share_and_lag(self) -> None:
        """Spend only this worker's share of each account's budget (Cloudflare meters per
        account, and other workers spend it too: see ``worker.sending.shares``), and report the
        lag now and then."""
        assigned = len(self.source.assignment())
        if assigned != self.status.assigned:
            self.status.assigned = assigned
            self._total_partitions = self.source.total_partitions() if assigned else 0
        self.shares.update(
            self.coalescer.pending_by_kind, self.status.assigned, self._total_partitions
        )
        now = self.clock.monotonic()
        if now - self._last_lag >= LAG_INTERVAL:
            self._last_lag = now
            for (topic, partition), lag in self.source.lag(self.records.last_seen()).items():
                metrics.CONSUMER_LAG.labels(topic, str(partition)).set(lag)
