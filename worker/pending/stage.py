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
from typing import NamedTuple

from worker.observe import metrics
from worker.pending.bucket import Owner, Pending
from worker.pending.coalescer import Coalescer
from worker.pending.ledger import COVERED, Key, PurgeLedger
from worker.planning.planner import SKIPPED, Planned, Routed
from worker.targets import Kind

# The share of targets meeting a pending one, from which a young backlog is worth waiting for.
REPEATING = 0.1
# What the ledger learns from outside between steps: the receipts feed's ``take``.
Learned = Callable[[], Sequence[tuple[Key, float]]]
# Shared target lists remembered at most (then started over).
MAX_PLANS = 10_000


class _Plan(NamedTuple):
    targets: Sequence[Routed]
    # The earliest send among their accepted purges (None: not yet known; -inf: not of exactly
    # these targets).
    since: float | None
    tally: tuple[tuple[tuple[Kind, str], int], ...]


class PendingTargets:
    def __init__(
        self, coalescer: Coalescer, ledger: PurgeLedger, learned: Learned | None = None
    ) -> None:
        self.coalescer = coalescer
        self.ledger = ledger
        self._learned = learned
        # Targets counted per step, not per target: the loop handles thousands a second.
        self._tally: dict[tuple[Kind, str], int] = {}
        # Records ``covered`` found purged, per tally of one such record (added to ``_tally``
        # when the step's metrics are flushed).
        self._hits: dict[tuple[tuple[tuple[Kind, str], int], ...], int] = {}
        self._margin = ledger.margin
        self._newest = -math.inf  # the latest event time of a record taken
        # Of the targets lately taken that were not already purged, the share that met one
        # pending or in flight: how likely what is pending is to meet more of itself. Until
        # steps have measured it, targets are taken to repeat: a young backlog's first full
        # requests, sent before the first repeat was read, all went again (2,000 to 2,500 of a
        # bulk re-publish's 32,000 targets); one that does not repeat is measured so within a
        # few steps.
        self.repeats = 1.0
        self._size = 0
        # Per list of targets that records share (the planning process gives records with the
        # same plan one list): its targets and, once a second record of it found every one
        # already purged, the earliest of their sends and the tally of a covered record.
        self._plans: dict[int, _Plan] = {}
        self._evictions = ledger.evictions

    def young(self, now: float) -> bool:
        """The newest record taken is younger than the ledger's margin: a purge sent now would
        not cover its repeats read later."""
        return self._newest + self.ledger.margin > now

    @property
    def repeating(self) -> bool:
        """Targets lately met themselves again (at least one in ten): waiting for the records
        still unread would save sends."""
        return self.repeats >= REPEATING

    @property
    def size(self) -> int:
        """Items pending (after deduplication and subsumption)."""
        return self.coalescer.pending

    def learn(self) -> int:
        """Let the ledger learn what receipts told since the last call (before any target of
        this step meets it). Returns the entries learned."""
        return self.ledger.learn(self._learned()) if self._learned is not None else 0

    def covered(self, plan: Planned) -> bool:
        """``plan``'s record waits for nothing: every target is known purged (``sift``).
        Counts the targets if so. False says only that this shortcut does not know: ``pend``
        decides."""
        return self.sift((plan,), 0, 1, 0.0, [])[2] == 1

    def sift(
        self, plans: Sequence[Planned], lo: int, hi: int, now: float, ages: list[float]
    ) -> tuple[list[int], int, int]:
        """Of ``plans[lo:hi]``, the records that wait for nothing: no rule fired for them, or
        every target of theirs is known purged by a request sent after their margin (a list of
        targets a record before found all purged: ``_covered``; one comparison, the ledger's
        verdict for each target). Their event ages as of ``now`` go to ``ages``, their targets
        are counted. Returns the positions of the others (each for ``pend``; a failure, warming
        or a dropped target always goes there), how many were skipped and how many purged.
        One pass over a poll's run: a backlog's records mostly end here, a few µs each."""
        known_plans, margin, hits, newest = self._plans, self._margin, self._hits, self._newest
        fresh = self.ledger.evictions == self._evictions
        rest: list[int] = []
        skipped = purged = 0
        for i in range(lo, hi):
            plan = plans[i]
            if plan is SKIPPED:
                skipped += 1
                continue
            _, event_time, ledger_time, _, targets, errors, warm, dropped = plan
            if ledger_time is None:
                rest.append(i)
                continue
            newest = ledger_time if ledger_time > newest else newest  # no call per record
            known = known_plans.get(id(targets))
            if (
                errors
                or warm
                or dropped
                or known is None
                or known.targets is not targets
                or known.since is None
                or known.since <= ledger_time + margin
                or not fresh
            ):
                rest.append(i)
                continue
            hits[known.tally] = hits.get(known.tally, 0) + 1
            purged += 1
            if event_time:
                ages.append(now - event_time)
        self._newest = newest
        return rest, skipped, purged

    def add(self, owner: Hashable, plan: Planned) -> int:
        """Take ``plan``'s targets for ``owner``; returns how many of them it must wait for
        (the ones the ledger finds already purged are done now). Never blocks."""
        return 0 if self.covered(plan) else self.pend(owner, plan)

    def pend(self, owner: Hashable, plan: Planned) -> int:
        """``add``, for a plan ``covered`` did not find purged: each target meets the ledger."""
        event_time = plan.ledger_time
        if event_time is not None:  # as ``covered`` does: the loop may not have asked it
            self._newest = max(self._newest, event_time)
        tally, targets = self._tally, plan.targets
        check, add = self.ledger.check, self.coalescer.add
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
        if not waiting and targets and event_time is not None:
            self._covered(targets)
        return waiting

    def _covered(self, targets: Sequence[Routed]) -> None:
        """Every target of ``targets`` was already purged: remember when they were
        (``PurgeLedger.purged_since``), so the next record with this very list is finished
        by ``covered``. Only a list that met purges already gets here: one that repeats."""
        plans = self._plans
        if self.ledger.evictions != self._evictions or len(plans) >= MAX_PLANS:
            plans.clear()
            self._evictions = self.ledger.evictions
        known = plans.get(id(targets))
        if known is None or known.targets is not targets or known.since is None:
            counts: dict[tuple[Kind, str], int] = {}
            for routed in targets:
                key = (routed.target.kind, "sent")
                counts[key] = counts.get(key, 0) + 1
            # Covered by a host, prefix or everything purge: not remembered, and not asked again.
            since = self.ledger.purged_since(targets)
            since = -math.inf if since is None else since
            plans[id(targets)] = _Plan(targets, since, tuple(counts.items()))

    def discard(self, drop: Callable[[Owner], bool]) -> int:
        """Forget the pending work of owners for which ``drop`` is true (their partitions are
        gone: the work would only be done again by their new owner). Returns the items gone."""
        return self.coalescer.discard(drop)

    def begin(self) -> None:
        """A step's targets are about to be taken (the sends since took some out)."""
        self._size = self.coalescer.pending

    def flush_metrics(self) -> None:
        """Count the targets taken since ``begin``."""
        tally = self._tally
        for hit, times in self._hits.items():
            for key, n in hit:
                tally[key] = tally.get(key, 0) + n * times
        self._hits.clear()
        met = sum(n for (_, how), n in self._tally.items() if how != "sent")
        if met:
            again = met - (self.coalescer.pending - self._size)
            self.repeats = 0.5 * self.repeats + 0.5 * again / met
        for (kind, how), n in self._tally.items():
            metrics.child(metrics.TARGETS, kind.value).inc(n)
            if how:
                metrics.child(metrics.TARGETS_ALREADY_PURGED, kind.value, how).inc(n)
        self._tally.clear()
