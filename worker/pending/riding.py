"""Records with one list of targets, judged once for many.

In a backlog the same article comes by again and again, and the planning process gives every
record with the same plan the same list of targets. Target by target, the ledger then gives
the same answers record after record: this one already purged, that one joins the request in
flight, the other waits in the pending set. ``Rides`` remembers, per list, what the last
record that asked was told, and gives a later record the same answers in one step, as long as
they are provably the ledger's own:

- already purged by an entry sent at S: for every record whose horizon (event time + margin) is
  below S, until an entry is forgotten (entries only move later);
- joins the request in flight sent at S: for a horizon below S, while that request has not
  ended, no other was sent for the target and no older one for it ended (``overlaps``), and no
  entry covers the record: every entry for the target was sent at or before the horizon it was
  judged at, so a record with no lower horizon is not covered by them either, and new entries
  come only from requests ending or from receipts (``learned``);
- waits on a pending item: while the item is still in the pending set (``gone``: sent, or taken
  over by an item that covers it), with no entry covering the record, as above.

Anything else, and the record asks the ledger target by target, and what it is told is
remembered in turn. Not thread-safe: only the loop's thread touches it.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Hashable, Sequence
from typing import NamedTuple

from worker.pending.bucket import Pending
from worker.pending.ledger import PurgeLedger
from worker.planning.planner import Routed
from worker.targets import Kind

# Lists remembered at most (then started over).
MAX_LISTS = 10_000
# ``how`` a target was taken: already purged, joining a request in flight, or pending.
SENT, IN_FLIGHT, PENDING = "sent", "in_flight", ""

Tally = dict[tuple[Kind, str], int]


class _Ride(NamedTuple):
    targets: Sequence[Routed]
    # The items the targets that were not already purged rode on (held weakly: an item whose
    # request ended is not kept alive for this), and whether each had left the pending set.
    items: tuple[weakref.ref[Pending], ...]
    gone: tuple[bool, ...]
    # Horizons the answers hold for: from ``low`` (None: the record had no event time, so the
    # ledger judged nothing, and only such records may ride) up to, not including, ``high``.
    low: float | None
    high: float
    changes: tuple[int, int, int]  # the ledger's ``learned``, ``overlaps`` and ``evictions``
    tally: tuple[tuple[tuple[Kind, str], int], ...]


class Rides:
    def __init__(self, ledger: PurgeLedger) -> None:
        self._ledger = ledger
        self._rides: dict[int, _Ride] = {}

    def take(
        self, targets: Sequence[Routed], owner: Hashable, horizon: float | None, tally: Tally
    ) -> int | None:
        """Give ``owner`` the answers remembered for ``targets``, if they are the ledger's for
        ``horizon``: it joins the items, and the targets are counted in ``tally``. Returns how
        many targets it waits for; None, taking nothing, if the ledger must be asked."""
        ride = self._rides.get(id(targets))
        if ride is None or ride.targets is not targets:
            return None
        if horizon is None:
            if ride.low is not None:
                return None
        elif ride.low is None or horizon < ride.low or horizon >= ride.high:
            return None
        ledger = self._ledger
        if ride.changes != (ledger.learned, ledger.overlaps, ledger.evictions):
            return None
        items = [ref() for ref in ride.items]
        for item, gone in zip(items, ride.gone, strict=True):
            if item is None or item.ended or item.gone is not gone:
                return None
        for item in items:
            item.owners.append(owner)  # type: ignore[union-attr]
        for key, n in ride.tally:
            tally[key] = tally.get(key, 0) + n
        return len(items)

    def remember(
        self,
        targets: Sequence[Routed],
        hows: list[str],
        items: list[Pending],
        horizon: float | None,
    ) -> None:
        """What the ledger answered, target by target, for a record with ``targets`` and
        ``horizon``: ``hows``, and the items of those not already purged, in order."""
        ledger = self._ledger
        high = math.inf
        for routed, how in zip(targets, hows, strict=True):
            if how == SENT:
                # Its own entry's send, or one covering it (host, prefix, everything), which
                # is not followed here.
                sent = ledger.purged_since((routed,))
                if sent is None or horizon is None or sent <= horizon:
                    return
                high = min(high, sent)
        for item, routed in zip(
            items, (r for r, h in zip(targets, hows, strict=True) if h != SENT), strict=True
        ):
            if item.gone:
                if item.target != routed.target or item.sent_at is None:
                    # A request for a host, prefix or everything: one for the target itself,
                    # sent later, would be the ledger's answer then.
                    return
                high = min(high, item.sent_at)
        if len(self._rides) >= MAX_LISTS:
            self._rides.clear()
        counts: Tally = {}
        for routed, how in zip(targets, hows, strict=True):
            key = (routed.target.kind, how)
            counts[key] = counts.get(key, 0) + 1
        self._rides[id(targets)] = _Ride(
            targets,
            tuple(weakref.ref(item) for item in items),
            tuple(item.gone for item in items),
            horizon,
            high,
            (ledger.learned, ledger.overlaps, ledger.evictions),
            tuple(counts.items()),
        )
