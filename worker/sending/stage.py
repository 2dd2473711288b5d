"""The sending stage: what is due leaves the pending set when this worker's share of the
account's budget can send it (``Dispatcher``, on a small thread pool), and what ended comes back
as each item's owners and its failure, if any.

The share itself moves with the demand of every worker spending the account (``ShareKeeper``);
the loop tells this stage what is pending and which partitions are this worker's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from worker.errors import PermanentError
from worker.pending.bucket import Owner, Pending
from worker.sending.dispatcher import Dispatcher
from worker.sending.shares import ShareKeeper
from worker.targets import Kind, Mode

# One pending item's outcome: the owners it stood for (once per target of each), and why it
# failed (None: purged).
Ended = tuple[Sequence[Owner], PermanentError | None]


class Purged(NamedTuple):
    """What one finished request purged, for its receipt."""

    zone: str
    zone_id: str
    mode: Mode
    kind: Kind
    items: list[Pending]  # the accepted ones, with the owners they stood for
    sent_at: float
    accepted_at: float
    request_ids: tuple[str, ...]


class Sending:
    def __init__(self, dispatcher: Dispatcher, shares: ShareKeeper, *, receipts: bool) -> None:
        self.dispatcher = dispatcher
        self.shares = shares
        # Without receipts nobody asks what was purged: nothing is kept for ``take_purged``.
        self._receipts = receipts
        self._purged: list[Purged] = []
        self._defer = 0.0  # the last ``send``'s

    @property
    def in_flight(self) -> int:
        """Requests sent whose outcome has not been collected."""
        return self.dispatcher.in_flight

    @property
    def ended(self) -> bool:
        """A request has ended and waits to be collected (``collect``)."""
        return self.dispatcher.ended

    def wake_at(self) -> tuple[float | None, float | None]:
        """When the loop should look again: the monotonic time budget refused by the last send
        is back, and the wall-clock time shares may next change (None: not known)."""
        return self.dispatcher.budget_at, self.shares.next_change()

    def send(self, *, drain: bool = False, defer: float = 0.0) -> int:
        """Send what is due and has budget, while threads are free; ``drain`` makes everything
        pending due, ``defer`` keeps windows open longer. Never blocks. Returns the requests
        sent."""
        self._defer = defer
        return self.dispatcher.dispatch(drain=drain, defer=defer)

    def send_again(self) -> int:
        """``send`` with the windows held as the last ``send`` held them, draining nothing:
        for threads freed between the loop's judgements."""
        return self.dispatcher.dispatch(defer=self._defer)

    def budget_bound(self) -> bool:
        """More is pending than a second of this worker's budget sends."""
        return self.dispatcher.budget_bound()

    def collect(self, timeout: float = 0.0) -> list[Ended]:
        """The items of every request that ended, waiting up to ``timeout`` for the first."""
        ended: list[Ended] = []
        now = self.dispatcher.clock.time()
        for batch, result in self.dispatcher.collect(timeout):
            errors: dict[object, PermanentError] = dict(result.failed)
            ended += [(item.owners, errors.get(item.target)) for item in batch.items]
            if result.accepted and self._receipts:
                accepted = set(result.accepted)
                self._purged.append(
                    Purged(
                        self.dispatcher.zone_name(batch.zone_id),
                        batch.zone_id,
                        batch.mode,
                        batch.kind,
                        [item for item in batch.items if item.target in accepted],
                        batch.sent_at,
                        now,
                        tuple(result.request_ids),
                    )
                )
        return ended

    def take_purged(self) -> list[Purged]:
        """The accepted requests ``collect`` saw since the last call."""
        purged, self._purged = self._purged, []
        return purged

    def update_shares(
        self, pending: Callable[[], Mapping[tuple[str, Kind], int]], assigned: int, total: int
    ) -> None:
        """Follow the demand (``pending()``: items per zone and kind) and this worker's
        ``assigned`` of ``total`` partitions. Cheap when nothing is due."""
        self.shares.update(pending, assigned, total)

    @property
    def on_the_wire(self) -> bool:
        """After ``close``: a request still runs (its read timeout is 30 s); its record is
        uncommitted, so the process may end without it."""
        return self.dispatcher.on_the_wire

    def close(self, timeout: float) -> None:
        """Send nothing more and leave the budget to the others. Requests under way are
        abandoned (their records are redelivered)."""
        self.dispatcher.close()
        self.shares.close(timeout)
