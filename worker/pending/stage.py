"""The pending stage: each planned record's targets meet the purge ledger, and what it does not
already cover waits in the pending set.

A target is one of three things: already purged by an accepted purge sent after its event
(its share of the record is done at once), joining a purge of it still in flight (the record
shares that purge's outcome), or pending (``Coalescer``). Only this stage writes the pending
items it owns. Not thread-safe: only the loop's thread touches it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence

from worker.observe import metrics
from worker.pending.bucket import Owner, Pending
from worker.pending.coalescer import Coalescer
from worker.pending.ledger import COVERED, Key, PurgeLedger
from worker.planning.planner import Planned
from worker.targets import Kind

# The share of targets meeting a pending one, from which a young backlog is worth waiting for.
REPEATING = 0.1
# What the ledger learns from outside between steps: the receipts feed's ``take``.
Learned = Callable[[], Sequence[tuple[Key, float]]]


class PendingTargets:
    def __init__(
        self, coalescer: Coalescer, ledger: PurgeLedger, learned: Learned | None = None
    ) -> None:
        self.coalescer = coalescer
        self.ledger = ledger
        self._learned = learned
        # Targets counted per step, not per target: the loop handles thousands a second.
        self._tally: dict[tuple[Kind, str], int] = {}
        self._newest = -math.inf  # the latest event time of a record taken
        # Of the targets lately taken that were not already purged, the share that met one
        # pending or in flight: how likely what is pending is to meet more of itself.
        self.repeats = 0.0
        self._size = 0

    def repeating(self, now: float) -> bool:
        """Whether waiting for the records still unread would save sends: the newest record
        taken is younger than the ledger's margin (a purge sent now would not cover its repeats
        read later), and targets lately met themselves again (at least one in ten)."""
        return self._newest + self.ledger.margin > now and self.repeats >= REPEATING

    @property
    def size(self) -> int:
        """Items pending (after deduplication and subsumption)."""
        return self.coalescer.pending

    def learn(self) -> int:
        """Let the ledger learn what receipts told since the last call (before any target of
        this step meets it). Returns the entries learned."""
        return self.ledger.learn(self._learned()) if self._learned is not None else 0

    def add(self, owner: Hashable, plan: Planned) -> int:
        """Take ``plan``'s targets for ``owner``; returns how many of them it must wait for
        (the ones the ledger finds already purged are done now). Never blocks."""
        event_time = plan.ledger_time
        if event_time is not None and event_time > self._newest:
            self._newest = event_time
        check, add, tally = self.ledger.check, self.coalescer.add, self._tally
        waiting = 0
        for zone, mode, target in plan.targets:
            verdict = check(zone.id, mode, target, event_time)
            if verdict is COVERED:
                how = "sent"
            else:
                waiting += 1
                if isinstance(verdict, Pending):
                    verdict.join(owner)
                    how = "in_flight"
                else:
                    add(zone.id, mode, target, owner)
                    how = ""
            key = (target.kind, how)
            tally[key] = tally.get(key, 0) + 1
        return waiting

    def discard(self, drop: Callable[[Owner], bool]) -> int:
        """Forget the pending work of owners for which ``drop`` is true (their partitions are
        gone: the work would only be done again by their new owner). Returns the items gone."""
        return self.coalescer.discard(drop)

    def begin(self) -> None:
        """A step's targets are about to be taken (the sends since took some out)."""
        self._size = self.coalescer.pending

    def flush_metrics(self) -> None:
        """Count the targets taken since ``begin``."""
        met = sum(n for (_, how), n in self._tally.items() if how != "sent")
        if met:
            again = met - (self.coalescer.pending - self._size)
            self.repeats = 0.5 * self.repeats + 0.5 * again / met
        for (kind, how), n in self._tally.items():
            metrics.child(metrics.TARGETS, kind.value).inc(n)
            if how:
                metrics.child(metrics.TARGETS_ALREADY_PURGED, kind.value, how).inc(n)
        self._tally.clear()
