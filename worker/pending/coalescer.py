"""The pending set: targets gathered per zone and mode, deduplicated and subsumed, until the
dispatcher takes them out in request-sized batches.

Duplicates collapse, and so do targets another pending target already covers:
- a pending ``everything`` for a zone swallows everything else for it;
- a host swallows the URLs and prefixes on that host;
- a prefix swallows the URLs and longer prefixes under it (on a path boundary: ``a.com/bar``
  covers ``a.com/bar/x`` and ``a.com/bar?x``, never ``a.com/barn``).

Every pending item remembers which records it stands for, and how many of each record's targets
(``owners``), so the pipeline can tell when a record is fully purged. A kind is *due* once a
request's worth of it is pending or the window since the first pending target has ended; what
is due leaves only when the dispatcher takes it (when the budget can send it), so under a
backlog targets keep collapsing here instead of going out again and again. Not thread-safe: only
the pipeline's loop touches it. Time comes from the injected clock.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

from worker.clock import Clock
from worker.targets import Kind, Mode, Target

Owner = Hashable


@dataclass(slots=True)
class Pending:
    target: Target
    owners: dict[Owner, int] = field(default_factory=dict)

    def absorb(self, other: Pending) -> None:
        for owner, count in other.owners.items():
            self.owners[owner] = self.owners.get(owner, 0) + count


@dataclass
class Batch:
    zone_id: str
    mode: Mode
    kind: Kind
    items: list[Pending]
    # Wall-clock time just before the request went (set by the dispatcher), for the ledger.
    sent_at: float = 0.0

    @property
    def targets(self) -> list[Target]:
        return [p.target for p in self.items]


def bare(url: str) -> str:
    """``https://a.com/x?y`` -> ``a.com/x?y``: the form prefixes are written in."""
    return url.split("://", 1)[1]


def covers(prefix: str, path: str) -> bool:
    """Whether ``prefix`` covers ``path`` (a bare URL or prefix), on a path boundary."""
    if not path.startswith(prefix):
        return False
    if len(path) == len(prefix) or prefix.endswith("/"):
        return True
    return path[len(prefix)] in "/?"


def netloc(path: str) -> str:
    return path.split("/", 1)[0]


class _ZoneBucket:
    def __init__(self, first_at: float) -> None:
        self.first_at = first_at
        self.everything: Pending | None = None
        self.hosts: dict[str, Pending] = {}
        # Prefixes and URLs indexed by host (with port, as written) for subsumption look-ups.
        self.prefixes: dict[str, dict[str, Pending]] = {}
        self.files: dict[str, dict[Target, Pending]] = {}
        self.tags: dict[str, Pending] = {}
        self.size = 0

    def count(self, kind: Kind) -> int:
        if kind is Kind.FILES:
            return sum(len(v) for v in self.files.values())
        if kind is Kind.PREFIXES:
            return sum(len(v) for v in self.prefixes.values())
        if kind is Kind.HOSTS:
            return len(self.hosts)
        if kind is Kind.TAGS:
            return len(self.tags)
        return 1 if self.everything else 0

    def add(self, target: Target, owner: Owner) -> None:
        """Add one target for ``owner``, merged into whatever pending item covers it."""
        item = Pending(target, {owner: 1})
        if self.everything is not None:
            self.everything.absorb(item)
            return
        kind = target.kind
        if kind is Kind.EVERYTHING:
            self._add_everything(item)
        elif kind is Kind.HOSTS:
            self._add_host(item)
        elif kind is Kind.PREFIXES:
            self._add_prefix(item)
        elif kind is Kind.FILES:
            self._add_file(item)
        else:
            self._merge(self.tags, target.value, item)

    def _merge(
        self, table: dict[str, Pending] | dict[Target, Pending], key: object, item: Pending
    ) -> None:
        existing = table.get(key)  # type: ignore[call-overload]
        if existing is None:
            table[key] = item  # type: ignore[index]
            self.size += 1
        else:
            existing.absorb(item)

    def _add_everything(self, item: Pending) -> None:
        for pending in self._all():
            item.absorb(pending)
        self.hosts.clear()
        self.prefixes.clear()
        self.files.clear()
        self.tags.clear()
        self.everything = item
        self.size = 1

    def _add_host(self, item: Pending) -> None:
        host = item.target.value
        self._merge(self.hosts, host, item)
        keeper = self.hosts[host]
        for table in (self.prefixes, self.files):
            swallowed = table.pop(host, None)
            if swallowed:
                for pending in swallowed.values():
                    keeper.absorb(pending)
                self.size -= len(swallowed)

    def _add_prefix(self, item: Pending) -> None:
        prefix = item.target.value
        host_key = netloc(prefix)
        host = self.hosts.get(host_key)
        if host is not None:
            host.absorb(item)
            return
        on_host = self.prefixes.setdefault(host_key, {})
        cover = next((p for key, p in on_host.items() if covers(key, prefix)), None)
        if cover is not None:
            cover.absorb(item)
            return
        for key in [k for k in on_host if covers(prefix, k)]:
            item.absorb(on_host.pop(key))
            self.size -= 1
        files = self.files.get(host_key, {})
        for t in [t for t in files if covers(prefix, bare(t.value))]:
            item.absorb(files.pop(t))
            self.size -= 1
        on_host[prefix] = item
        self.size += 1

    def _add_file(self, item: Pending) -> None:
        path = bare(item.target.value)
        host_key = netloc(path)
        host = self.hosts.get(host_key)
        if host is not None:
            host.absorb(item)
            return
        for key, cover in self.prefixes.get(host_key, {}).items():
            if covers(key, path):
                cover.absorb(item)
                return
        self._merge(self.files.setdefault(host_key, {}), item.target, item)

    def _all(self) -> Iterator[Pending]:
        if self.everything:
            yield self.everything
        yield from self.hosts.values()
        for table in self.prefixes.values():
            yield from table.values()
        for files in self.files.values():
            yield from files.values()
        yield from self.tags.values()

    def discard(self, drop: Callable[[Owner], bool]) -> int:
        """Remove owners for which ``drop`` is true; items left with no owner go. Returns how
        many items went."""
        removed = 0
        tables: list[dict[Any, Pending]] = [self.hosts, self.tags]
        tables += list(self.prefixes.values()) + list(self.files.values())
        for table in tables:
            for key in list(table):
                pending = table[key]
                pending.owners = {o: c for o, c in pending.owners.items() if not drop(o)}
                if not pending.owners:
                    del table[key]
                    removed += 1
        if self.everything is not None:
            self.everything.owners = {
                o: c for o, c in self.everything.owners.items() if not drop(o)
            }
            if not self.everything.owners:
                self.everything = None
                removed += 1
        for nested in (self.prefixes, self.files):
            for netloc in [n for n, t in nested.items() if not t]:
                del nested[netloc]
        self.size -= removed
        return removed

    def take(self, kind: Kind, limit: int | None = None) -> list[Pending]:
        """Remove and return up to ``limit`` pending items of ``kind`` (all when None)."""
        out: list[Pending] = []
        if kind is Kind.EVERYTHING:
            if self.everything:
                out, self.everything = [self.everything], None
        elif kind in (Kind.HOSTS, Kind.TAGS):
            table = self.hosts if kind is Kind.HOSTS else self.tags
            for key in list(itertools.islice(table, limit)):
                out.append(table.pop(key))
        else:
            nested = self.files if kind is Kind.FILES else self.prefixes
            for netloc in list(nested):
                inner: dict[object, Pending] = nested[netloc]  # type: ignore[assignment]
                room = None if limit is None else limit - len(out)
                for item_key in list(itertools.islice(inner, room)):
                    out.append(inner.pop(item_key))
                if not inner:
                    del nested[netloc]
        self.size -= len(out)
        return out


@dataclass(frozen=True)
class Due:
    """A kind of one zone and mode with targets ready to go."""

    first_at: float  # when the window of these targets began (oldest first)
    zone_id: str
    mode: Mode
    kind: Kind
    count: int
    whole: bool  # the window has ended (or a drain): everything goes, not only full requests


class Coalescer:
    def __init__(
        self, window_seconds: float, cap: Callable[[str, Kind], int], clock: Clock
    ) -> None:
        self._window = window_seconds
        self._cap = cap
        self._clock = clock
        self._buckets: dict[tuple[str, Mode], _ZoneBucket] = {}

    @property
    def pending(self) -> int:
        return sum(b.size for b in self._buckets.values())

    def pending_by_kind(self) -> dict[tuple[str, Kind], int]:
        """Items pending per zone and kind (what the budget exchange reports as demand)."""
        out: dict[tuple[str, Kind], int] = {}
        for (zone_id, _), bucket in self._buckets.items():
            for kind in Kind:
                if n := bucket.count(kind):
                    out[(zone_id, kind)] = out.get((zone_id, kind), 0) + n
        return out

    def add(self, zone_id: str, mode: Mode, target: Target, owner: Owner) -> None:
        key = (zone_id, mode)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _ZoneBucket(self._clock.monotonic())
        bucket.add(target, owner)

    def next_due(self) -> float | None:
        """Monotonic time at which the next window ends, if one is still open (None if not)."""
        now = self._clock.monotonic()
        ends = [b.first_at + self._window for b in self._buckets.values()]
        upcoming = [end for end in ends if end > now]
        return min(upcoming) if upcoming else None

    def ready(self, *, drain: bool = False) -> list[Due]:
        """What is due now, oldest window first. ``drain`` makes everything due (shutdown)."""
        now = self._clock.monotonic()
        out: list[Due] = []
        for (zone_id, mode), bucket in self._buckets.items():
            whole = drain or now - bucket.first_at >= self._window
            for kind in Kind:
                count = bucket.count(kind)
                if not count:
                    continue
                # "everything" is one item, always a whole request.
                all_of_it = whole or kind is Kind.EVERYTHING
                if all_of_it or count >= self._cap(zone_id, kind):
                    out.append(Due(bucket.first_at, zone_id, mode, kind, count, all_of_it))
        out.sort(key=lambda d: d.first_at)
        return out

    def count(self, zone_id: str, mode: Mode, kind: Kind) -> int:
        bucket = self._buckets.get((zone_id, mode))
        return bucket.count(kind) if bucket else 0

    def take(self, zone_id: str, mode: Mode, kind: Kind, limit: int) -> Batch:
        """Remove up to ``limit`` pending items of one kind, as a batch."""
        key = (zone_id, mode)
        bucket = self._buckets[key]
        batch = Batch(zone_id, mode, kind, bucket.take(kind, limit))
        if bucket.size == 0:
            del self._buckets[key]
        return batch

    def due(self, *, drain: bool = False) -> list[Batch]:
        """Every due batch now, whatever the budget: full requests, and everything whose window
        has ended (all of it with ``drain``). For callers without a budget to respect."""
        batches: list[Batch] = []
        for due in self.ready(drain=drain):
            cap = self._cap(due.zone_id, due.kind)
            while (n := self.count(due.zone_id, due.mode, due.kind)) and (due.whole or n >= cap):
                batches.append(self.take(due.zone_id, due.mode, due.kind, cap))
        return batches

    def flush_all(self) -> list[Batch]:
        """Every pending target, now."""
        return self.due(drain=True)

    def discard(self, drop: Callable[[Owner], bool]) -> int:
        """Forget pending work of owners for which ``drop`` is true (revoked partitions)."""
        removed = 0
        for key, bucket in list(self._buckets.items()):
            removed += bucket.discard(drop)
            if bucket.size == 0:
                del self._buckets[key]
        return removed
