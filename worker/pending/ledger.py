"""The purge ledger: when each item was last purged, so a backlog purges each change once.

A change is visible at the origin before its event is produced. So a purge *sent* at time S
covers every event produced before S: the cache cannot hold content older than the purge. A
target whose record's event time E satisfies ``E < S - margin`` is already purged, and its record's
share of it finishes without a request. The margin absorbs clock skew between producers and this
worker. Covering purges count: everything ⊃ host ⊃ prefix ⊃ URL (``worker.pending.cover``).

While a covering purge is still in flight, the target joins it and shares its outcome instead of
being sent again. Memory is bounded (least recently used entries go first). Forgetting an entry,
or a restart, only ever means purging again, never skipping.

Not thread-safe: only the loop's thread touches it.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from worker.config.model import LedgerSettings
from worker.observe import metrics
from worker.pending.bucket import Pending
from worker.pending.cover import bare, netloc, prefixes_covering
from worker.receipts import LedgerKey
from worker.targets import Kind, Mode, Target

# (zone id, mode, kind, value, cache-key headers): one purgeable item of one zone.
Key = LedgerKey
__all__ = ["COVERED", "LedgerSettings", "PurgeLedger"]


class _Covered:
    """``check``'s answer for a target an accepted purge already covers."""

    def __repr__(self) -> str:
        return "COVERED"


COVERED = _Covered()
# The kinds whose entries can cover a target of another kind.
COVERING = frozenset({Kind.EVERYTHING, Kind.HOSTS, Kind.PREFIXES})


def key_of(zone_id: str, mode: Mode, target: Target) -> Key:
    value = "" if target.kind is Kind.EVERYTHING else target.value
    return (zone_id, mode, target.kind, value, target.headers)


class PurgeLedger:
    def __init__(self, settings: LedgerSettings) -> None:
        self._settings = settings
        self._enabled, self._margin = settings.enabled, settings.margin_seconds
        self._sent: OrderedDict[Key, float] = OrderedDict()
        self._in_flight: dict[Key, tuple[float, Pending]] = {}
        # Entries of the kinds that cover others (everything, hosts, prefixes) per zone and mode:
        # a URL is looked up under them only where some exist, and with none at all (a backlog
        # of URLs and tags) a target is one look-up.
        self._kinds: dict[tuple[str, Mode, Kind], int] = {}
        # Entries forgotten so far: what was learned from ``purged_since`` holds while this does.
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._sent)

    @property
    def margin(self) -> float:
        """How much older than a purge's send a record must be for the purge to cover it (0
        when the ledger is off: nothing is covered, and nothing is gained by waiting)."""
        return self._margin if self._enabled else 0.0

    def check(
        self, zone_id: str, mode: Mode, target: Target, event_time: float | None
    ) -> _Covered | Pending | None:
        """``COVERED`` if an accepted purge sent after ``event_time`` + margin covers ``target``;
        the in-flight item to join if such a purge is under way; else None (send it)."""
        if event_time is None or not self._enabled:
            return None
        horizon = event_time + self._margin
        kind = target.kind
        found = self._find(key_of(zone_id, mode, target), horizon)
        if found is not None or kind is Kind.EVERYTHING or not self._kinds:
            return found
        # Only kinds this zone and mode have entries of can cover the target.
        kinds = self._kinds
        if (zone_id, mode, Kind.EVERYTHING) in kinds:
            found = self._find((zone_id, mode, Kind.EVERYTHING, "", ()), horizon)
        if found is None and kind in (Kind.FILES, Kind.PREFIXES):
            path = bare(target.value) if kind is Kind.FILES else target.value
            if (zone_id, mode, Kind.HOSTS) in kinds:
                found = self._find((zone_id, mode, Kind.HOSTS, netloc(path), ()), horizon)
            if found is None and (zone_id, mode, Kind.PREFIXES) in kinds:
                for prefix in prefixes_covering(path):
                    if prefix != target.value:
                        found = self._find((zone_id, mode, Kind.PREFIXES, prefix, ()), horizon)
                        if found is not None:
                            break
        return found

    def purged_since(self, targets: Iterable[tuple[Any, Mode, Target]]) -> float | None:
        """The earliest send among the accepted purges of exactly these routed targets (None:
        one has none). Sends only move later, so until an entry is forgotten (``evictions``)
        every record whose event time + margin is below it is covered, target by target."""
        low = math.inf
        for zone, mode, target in targets:
            sent = self._sent.get(key_of(zone.id, mode, target))
            if sent is None:
                return None
            low = min(low, sent)
        return low if low < math.inf else None

    def _find(self, key: Key, horizon: float) -> _Covered | Pending | None:
        sent = self._sent.get(key)
        if sent is not None and sent > horizon:
            self._sent.move_to_end(key)
            return COVERED
        flight = self._in_flight.get(key)
        if flight is not None and flight[0] > horizon:
            return flight[1]
        return None

    def sending(self, zone_id: str, mode: Mode, items: Iterable[Pending], sent_at: float) -> None:
        """A request for ``items`` is about to go; ``sent_at`` is wall-clock time before it does
        (earlier than the real send, so never a skip too many)."""
        if not self._settings.enabled:
            return
        for item in items:
            key = key_of(zone_id, mode, item.target)
            self._in_flight[key] = (sent_at, item)
            self._count(key, +1)

    def settled(
        self,
        zone_id: str,
        mode: Mode,
        items: Iterable[Pending],
        sent_at: float,
        accepted: set[Target],
    ) -> None:
        """The request for ``items`` ended; the ``accepted`` ones are purged as of ``sent_at``."""
        if not self._settings.enabled:
            return
        for item in items:
            key = key_of(zone_id, mode, item.target)
            flight = self._in_flight.get(key)
            if flight is not None and flight[1] is item:
                del self._in_flight[key]
                self._count(key, -1)
            if item.target in accepted:
                self._remember(key, sent_at)
        metrics.LEDGER_ENTRIES.set(len(self._sent))

    def learn(self, entries: Iterable[tuple[Key, float]]) -> int:
        """Items purged as of their send time, as receipts tell (this worker's before a restart,
        or another's): the same rule then finishes their targets without a request. Returns how
        many were learned."""
        if not self._enabled:
            return 0
        count = 0
        for key, sent_at in entries:
            self._remember(key, sent_at)
            count += 1
        if count:
            metrics.LEDGER_RESTORED.inc(count)
            metrics.LEDGER_ENTRIES.set(len(self._sent))
        return count

    def _remember(self, key: Key, sent_at: float) -> None:
        previous = self._sent.get(key)
        if previous is None:
            self._count(key, +1)
            self._sent[key] = sent_at
        else:
            self._sent[key] = max(previous, sent_at)
            self._sent.move_to_end(key)
        while len(self._sent) > self._settings.max_entries:
            evicted, _ = self._sent.popitem(last=False)
            self._count(evicted, -1)
            self.evictions += 1

    def _count(self, key: Key, delta: int) -> None:
        if key[2] not in COVERING:
            return
        kind = (key[0], key[1], key[2])
        left = self._kinds.get(kind, 0) + delta
        if left > 0:
            self._kinds[kind] = left
        else:
            self._kinds.pop(kind, None)
