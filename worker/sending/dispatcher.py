"""Cuts batches from the pending set when the account's budget can send them, and runs them.

A request is cut when its budget is there, not merely because it is full: until then its targets
stay pending, where later duplicates collapse into them. Due kinds are served oldest window
first, and a kind without budget is passed over, so tags waiting minutes for the free plan's
bucket never hold back URLs. The budget is reserved at the moment of cutting and the request
goes at once on a free thread, so reservations never pile up into a burst.

Not thread-safe: only the loop's thread calls it. Requests run on a small thread pool.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import structlog

from worker.clock import Clock
from worker.cloudflare.meters import Ticket
from worker.errors import Abandoned, RetriesExhausted
from worker.pending.coalescer import Batch, Coalescer
from worker.pending.ledger import PurgeLedger
from worker.sending.purger import BatchResult, Destination, Purger

log = structlog.get_logger("worker.sending.dispatcher")

# How long an idle ``collect`` waits between looks when nothing is in flight.
IDLE_STEP = 0.05
# A request smaller than a full one is cut to fill the budget's room only if it carries at
# least 1/MIN_FILL of a full one: slivers would cost requests for almost nothing.
MIN_FILL = 10


class Dispatcher:
    def __init__(
        self,
        coalescer: Coalescer,
        destinations: Mapping[str, Destination],
        purger: Purger,
        ledger: PurgeLedger,
        clock: Clock,
        *,
        concurrency: int,
    ) -> None:
        self._coalescer = coalescer
        self._destinations = destinations
        self._purger = purger
        self._ledger = ledger
        self._clock = self.clock = clock
        self._concurrency = concurrency
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="purge")
        self._futures: dict[Future[BatchResult], Batch] = {}
        self._budget_at: float | None = None

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet collected."""
        return len(self._futures)

    @property
    def ended(self) -> bool:
        """A request has ended and waits to be collected."""
        return any(future.done() for future in self._futures)

    def zone_name(self, zone_id: str) -> str:
        return self._destinations[zone_id].zone_name

    @property
    def budget_at(self) -> float | None:
        """Monotonic time at which budget refused by the last ``dispatch`` is back (None if no
        due batch was refused): when the loop should look again."""
        return self._budget_at

    def dispatch(self, *, drain: bool = False, defer: float = 0.0) -> int:
        """Send every due batch whose budget is there, while threads are free. Never blocks.
        ``drain`` makes every pending target due (shutdown); ``defer`` keeps windows open
        longer (``Coalescer.ready``). Returns how many batches went."""
        sent = 0
        self._budget_at = None
        for due in self._coalescer.ready(drain=drain, defer=defer):
            dest = self._destinations[due.zone_id]
            cap = dest.limiter.cap(due.kind)
            # A small share of the URL budget sends smaller requests, never one above its second.
            largest = min(cap, dest.limiter.largest(due.kind))
            while len(self._futures) < self._concurrency:
                count = self._coalescer.count(due.zone_id, due.mode, due.kind)
                size = min(count, largest)
                if not size or (size < largest and not due.whole):
                    break  # what is left waits for its window
                wait, ticket = dest.limiter.reserve_ticket(due.kind, size)
                if wait > 0 and size == largest:
                    # A full request does not fit, but a smaller one may: a second's budget is
                    # rarely a whole number of requests (760 URLs on free, 100 a request), and
                    # under a backlog the rest of it would otherwise go unused.
                    room = dest.limiter.room(due.kind)
                    if room >= max(1, cap // MIN_FILL):
                        size = room
                        wait, ticket = dest.limiter.reserve_ticket(due.kind, size)
                if wait > 0:  # no budget for this kind now; other kinds may still go
                    at = self._clock.monotonic() + wait
                    self._budget_at = at if self._budget_at is None else min(self._budget_at, at)
                    break
                batch = self._coalescer.take(due.zone_id, due.mode, due.kind, size)
                self._submit(dest, batch, ticket)
                sent += 1
            if len(self._futures) >= self._concurrency:
                break
        return sent

    def budget_bound(self) -> bool:
        """More is pending for some account than this worker's share of it sends in a
        second: the budget, not the window, decides when targets go."""
        for (zone_id, kind), count in self._coalescer.pending_by_kind().items():
            if self._destinations[zone_id].limiter.seconds_for(kind, count) > 1.0:
                return True
        return False

    def _submit(self, dest: Destination, batch: Batch, ticket: Ticket | None) -> None:
        batch.sent_at = self._clock.time()
        self._ledger.sending(batch.zone_id, batch.mode, batch.items, batch.sent_at)
        future = self._pool.submit(
            self._purger.send,
            dest,
            batch.kind,
            batch.mode,
            batch.targets,
            reserved=True,
            ticket=ticket,
        )
        self._futures[future] = batch

    def collect(self, timeout: float = 0.0) -> list[tuple[Batch, BatchResult]]:
        """Batches whose requests ended, waiting up to ``timeout`` for the first one."""
        if timeout > 0:
            if self._futures:
                wait(list(self._futures), timeout=timeout, return_when=FIRST_COMPLETED)
            else:
                self._clock.sleep(min(timeout, IDLE_STEP))
        out = []
        for future in [f for f in self._futures if f.done()]:
            batch = self._futures.pop(future)
            try:
                result = future.result()
            except Abandoned:
                # Only at shutdown: the records stay unfinished and are redelivered.
                self._ledger.settled(batch.zone_id, batch.mode, batch.items, batch.sent_at, set())
                continue
            except Exception as exc:
                log.exception("purge batch crashed", zone=batch.zone_id, kind=batch.kind.value)
                result = BatchResult(failed=[(t, RetriesExhausted(exc, 1)) for t in batch.targets])
            accepted = set(result.accepted)
            self._ledger.settled(batch.zone_id, batch.mode, batch.items, batch.sent_at, accepted)
            out.append((batch, result))
        return out

    @property
    def on_the_wire(self) -> bool:
        """A request is still running (after ``close``: one that ends with the process)."""
        return any(not f.done() for f in self._futures)

    def close(self) -> None:
        """Stop taking work; requests under way are abandoned (their records are redelivered):
        their retry and budget waits end at once, a request on the wire ends with the process."""
        self._purger.abandon()
        self._pool.shutdown(wait=False, cancel_futures=True)
