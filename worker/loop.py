"""The worker's loop: records in, purges out, offsets committed only behind finished records.

One thread runs five stages in the order a record meets them:

    intake → planning → pending → sending → outcome

Each step polls the source (``intake``), plans every record (``planning``), lets the purge ledger
finish what an earlier purge covers and pends the rest (``pending``), sends what the budget allows
and collects what ended (``sending``), then finishes records, dead-lettering those with failures,
and commits (``outcome``). A record is finished when every target it produced was accepted by the
API, already covered, or failed for good; only then does its offset become committable. The stages
own their state; the loop only hands each one what the one before it produced.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass, field

import structlog

from worker.clock import Clock
from worker.events import Record, TopicPartition
from worker.intake.stage import Intake
from worker.observe import metrics
from worker.outcome.inflight import Opened
from worker.outcome.stage import Outcome
from worker.pending.stage import PendingTargets
from worker.planning.planner import Planned
from worker.planning.stage import Planning
from worker.runtime import tune_gc
from worker.sending.stage import Sending

log = structlog.get_logger("worker.loop")

BUSY_POLL = 0.05
IDLE_POLL = 0.5
# After the drain deadline: the last commit and closing the clients, within the +2 s allowed.
FINAL_COMMIT_WAIT = 1.0
# Closing a Kafka client or the budget exchange at shutdown (each).
CLOSE_WAIT = 0.4


@dataclass
class Status:
    """What the health endpoints and tests read; written only by the loop."""

    last_poll: float = 0.0
    last_record: float = 0.0
    assigned: int = 0
    running: bool = False
    # Stopping: the revocation hook keeps out (the drain runs without the loop's lock).
    draining: bool = False


@dataclass(eq=False)
class Loop:
    """The stages, in the order a record meets them, and what the loop keeps of its own."""

    intake: Intake
    planning: Planning[Opened]
    pending: PendingTargets
    sending: Sending
    outcome: Outcome
    clock: Clock
    drain_deadline: float
    status: Status = field(init=False, default_factory=Status)
    # Held by the loop except while it waits inside ``poll``: a revocation (which the Kafka
    # client runs on its own thread while ``poll`` waits) settles records only while it holds it.
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock, repr=False)
    # A young backlog is being held back until it is read (``_defer``).
    _held: bool = field(init=False, default=False, repr=False)

    def __post_init__(self) -> None:
        self.intake.on_revoke(self._settle_for_handover)

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
        """One iteration: poll, plan, pend, send, finish, commit. Never blocks for long."""
        with self._lock:
            holding = self.intake.holding()
            # While holding, the poll itself is the point (it completes the rejoin): a zero
            # timeout, as a budget already due would give, lets it return before the group
            # answers.
            timeout = BUSY_POLL if holding else self._poll_timeout()
        records = self.intake.poll(timeout)
        with self._lock:
            # The rebalance may have begun inside that poll, which can return after the
            # revocation committed and before the group answers: what is sent then belongs to
            # partitions that may be another replica's, past their committed offsets.
            self._after_poll(records, holding or self.intake.holding())

    def _after_poll(self, records: list[Record], holding: bool) -> None:
        # A rebalance happens inside poll(): forget the revoked partitions before taking the
        # records this poll returned, which already belong to the new assignment.
        revoked = self.intake.take_revoked()
        if revoked:
            self._forget(revoked, "partitions revoked")
        self.status.last_poll = now = self.clock.time()
        metrics.LAST_POLL_TIME.set(now)
        opened = self.outcome.open(records, self._rewound)
        self._turn(holding)
        # Waiting for plans, the loop still frees the threads of requests that ended.
        self.planning.submit(opened, records, lambda: self._meanwhile(holding))
        self._turn(holding)
        self._pend()
        # Before the sends: a share that changed since the last step (the whole budget, once
        # this worker knows it is alone) is spent in this step, not the next.
        self._follow_shares()
        self._send_and_settle(send=not holding)
        self.outcome.finish()
        self.status.last_record = self.outcome.last_record
        self.intake.backpressure(self.pending.size, len(self.outcome.records))
        if not holding:  # the revocation commits; the group refuses other commits meanwhile
            self.outcome.commits.maybe_commit()

    @property
    def idle(self) -> bool:
        """Nothing pending, in flight or waiting to be finished."""
        return not (
            len(self.outcome.records)
            or self.planning.waiting
            or self.sending.in_flight
            or self.pending.size
        )

    def drain(self, deadline_seconds: float | None = None) -> None:
        """Stop taking records, purge what is pending within the deadline, commit, close.

        Returns within the deadline plus about ``FINAL_COMMIT_WAIT + 2 * CLOSE_WAIT`` whatever
        is going on: purges still retrying or waiting for budget are abandoned and their
        records, like every unfinished one, are left uncommitted for redelivery."""
        if deadline_seconds is None:
            deadline_seconds = self.drain_deadline
        deadline = self.clock.monotonic() + deadline_seconds
        self.status.draining = True  # from here the loop runs without its lock
        self.intake.pause()
        # Records read are purged like the others, if the planning process still answers.
        self._pend(self.planning.join(lambda: deadline - self.clock.monotonic()))
        self.planning.close()
        # A tripped guard stops the sending too: what is pending waits on Kafka for the fix (a
        # restart would only purge it again). Dead letters already under way are confirmed.
        sending = not self.outcome.tripped
        while (
            (sending and (self.pending.size or self.sending.in_flight)) or self.outcome.writing
        ) and (remaining := deadline - self.clock.monotonic()) > 0:
            if sending:
                self.sending.send(drain=True)
            self._settle(timeout=min(remaining, BUSY_POLL))
            self._follow_shares()  # the split moves on while this worker drains
            self.outcome.finish()
        self.sending.close(CLOSE_WAIT)
        self.outcome.finish(final=True)
        self.outcome.commits.commit(wait=FINAL_COMMIT_WAIT)
        if self.outcome.records:
            late = self.clock.monotonic() >= deadline
            log.warning(
                "drain deadline reached; unfinished records will be redelivered"
                if late
                else "stopping with unfinished records; they will be redelivered",
                records=len(self.outcome.records),
            )
        self.intake.close(CLOSE_WAIT)
        self.outcome.close(CLOSE_WAIT)

    def _poll_timeout(self) -> float:
        if self.planning.waiting:
            return 0.0  # plans are on their way: take what Kafka has, then them
        busy = self.outcome.records or self.sending.in_flight or self.pending.size
        timeout = BUSY_POLL if busy else IDLE_POLL
        now = self.clock.monotonic()
        budget_at, change = self.sending.wake_at()
        for at in (self.pending.coalescer.next_due(), budget_at):
            if at is not None:
                timeout = max(0.0, min(timeout, at - now))
        if change is not None:  # shares move on wall-clock boundaries
            timeout = max(0.0, min(timeout, change - self.clock.time()))
        return timeout

    # -- between the stages -----------------------------------------------------------------------

    def _rewound(self, tps: set[TopicPartition]) -> None:
        """Partitions being read again from an earlier position (a rebalance, a reset): their
        bookkeeping starts over."""
        self._forget(tps, "partition rewound")

    def _pend(self, plans: Iterable[tuple[Opened, Sequence[Planned]]] | None = None) -> None:
        """Hand the plans ready (or ``plans``) to the outcome stage, which finishes the records
        that wait for nothing and pends the others' targets."""
        ready = self.planning.poll() if plans is None else plans
        self.pending.learn()  # what receipts told since, before any target meets the ledger
        self.pending.begin()
        for opened, planned in ready:
            self.outcome.planned(opened, planned, self.pending.sift, self.pending.pend)
        self.pending.flush_metrics()

    def _send_and_settle(self, *, send: bool = True) -> None:
        defer = self._defer() if send else 0.0
        pending = self.pending.size > 0 or self.planning.waiting  # plans on their way count too
        end = send and self.intake.read_to_end(  # a backlog read: what it left goes now
            pending, self.outcome.records.last_planned, self.sending.budget_bound
        )
        if send:
            self.sending.send(defer=defer, drain=end)
        if self._settle() and send:
            self.sending.send(defer=defer, drain=end)  # threads just freed

    def _turn(self, holding: bool) -> None:
        """Requests that ended meanwhile free their threads for the next batches now: with
        budget to spare, a backlog's requests otherwise wait on the loop, not the API."""
        if self.sending.in_flight:
            self._send_and_settle(send=not holding)

    def _meanwhile(self, holding: bool) -> None:
        """While the loop waits for plans (it looks often): requests that ended free their
        threads for what is due, held back as the step's last sends were (``_defer``). Whether
        a backlog is read to its end is the step's to judge, with every plan in."""
        if self.sending.ended and self._settle() and not holding:
            self.sending.send_again()

    def _defer(self) -> float:
        """How much longer windows stay open. While records younger than the ledger's margin
        are still being read from a backlog and the budget, not the window, decides when
        targets go, a purge sent now would go again for the records still to come (the ledger
        covers only records older than the margin at the send: a bulk re-publish sent 1.6
        items per distinct one). So what is pending waits for them, at most the margin; with
        budget to spare, old records, targets that do not repeat, or nothing more to read,
        nothing waits.

        Once a young backlog is held, it is held until it is read (or its targets are measured
        not to repeat): the records still unread are younger than those read, so the newest
        record read growing old says nothing of them (a hold that ended there sent 1.2 to 1.4
        items per distinct one). Nor does reading paused for the records waiting: the margin
        does (ended at the pause, a burst over ``max_pending_records`` sent 1.13-1.19)."""
        young = self._held or self.pending.young(self.clock.time())
        self._held = (
            young
            and self.pending.repeating
            and self.sending.budget_bound()
            and self.intake.behind(self.outcome.records.last_planned())
        )
        return self.pending.ledger.margin if self._held else 0.0

    def _settle(self, timeout: float = 0.0) -> bool:
        """Hand the requests that ended (waiting up to ``timeout`` for one) to the outcome
        stage; True if any did."""
        ended = self.sending.collect(timeout)
        if ended:
            self.outcome.settle(ended, self.sending.take_purged())
        return bool(ended)

    def _settle_for_handover(self) -> bool:
        """The revocation's hook (on the Kafka client's thread, while the loop waits in
        ``poll``): settle the requests that ended and finish their records, so the revocation
        commits them. True once nothing is in flight and their receipts are written (records
        above an unfinished one stay uncommitted: their next owner's ledger learns from the
        receipts that they are purged), or when the loop is not parked in ``poll`` (then nothing
        here may touch its state, and the revocation commits what is finished)."""
        if self.status.draining or not self._lock.acquire(blocking=False):
            return True
        try:
            self._settle()
            self.outcome.finish()
            return not self.sending.in_flight and self.outcome.receipts_written()
        finally:
            self._lock.release()

    def _forget(self, tps: Set[TopicPartition], why: str) -> None:
        """Drop all state of records from ``tps``: their new owner (or re-read) redoes them."""
        gone, dropped_records = self.outcome.forget(tps)
        # Their pending targets would only spend the budget on work that is done again anyway.
        dropped = self.pending.discard(lambda owner: owner in gone)
        log.info(
            why,
            partitions=sorted(f"{t}[{p}]" for t, p in tps),
            dropped_records=dropped_records,
            dropped_targets=dropped,
        )

    def _follow_shares(self) -> None:
        """Spend only this worker's share of each account's budget (Cloudflare meters per
        account, and other workers spend it too: see ``worker.sending.shares``), and report the
        lag now and then."""
        assigned, total = self.intake.partitions()
        self.status.assigned = assigned
        self.sending.update_shares(self.pending.coalescer.pending_by_kind, assigned, total)
        self.intake.report_lag(self.outcome.records.last_seen())
