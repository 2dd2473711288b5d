"""Gathers targets per zone and mode for a short window, then hands out request-sized batches.

Duplicates collapse, and so do targets another pending target already covers:
- a pending ``everything`` for a zone swallows everything else for it;
- a host swallows the URLs and prefixes on that host;
- a prefix swallows the URLs and longer prefixes under it (on a path boundary: ``a.com/bar``
  covers ``a.com/bar/x`` and ``a.com/bar?x``, never ``a.com/barn``).

Every pending item remembers which records it stands for, and how many of each record's targets
(``owners``), so the pipeline can tell when a record is fully purged. Not thread-safe: only the
pipeline's loop touches it. Time comes from the injected clock.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

from worker.clock import Clock
from worker.targets import Kind, Mode, Target

Owner = Hashable


@dataclass
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

    @property
    def targets(self) -> list[Target]:
        return [p.target for p in self.items]


def _bare(url: str) -> str:
    """``https://a.com/x?y`` -> ``a.com/x?y``: the form prefixes are written in."""
    return url.split("://", 1)[1]


def _covers(prefix: str, bare: str) -> bool:
    if not bare.startswith(prefix):
        return False
    if len(bare) == len(prefix) or prefix.endswith("/"):
        return True
    return bare[len(prefix)] in "/?"


def _netloc(bare: str) -> str:
    return bare.split("/", 1)[0]


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

    def add(self, target: Target, owner: Owner) -> Kind:
        """Add one target; return the kind whose pending set it ended up in."""
        item = Pending(target, {owner: 1})
        if self.everything is not None:
            self.everything.absorb(item)
            return Kind.EVERYTHING
        kind = target.kind
        if kind is Kind.EVERYTHING:
            self._add_everything(item)
        elif kind is Kind.HOSTS:
            self._add_host(item)
        elif kind is Kind.PREFIXES:
            return self._add_prefix(item)
        elif kind is Kind.FILES:
            return self._add_file(item)
        else:
            self._merge(self.tags, target.value, item)
        return kind

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

    def _add_prefix(self, item: Pending) -> Kind:
        prefix = item.target.value
        netloc = _netloc(prefix)
        host = self.hosts.get(netloc)
        if host is not None:
            host.absorb(item)
            return Kind.HOSTS
        on_host = self.prefixes.setdefault(netloc, {})
        cover = next((p for key, p in on_host.items() if _covers(key, prefix)), None)
        if cover is not None:
            cover.absorb(item)
            return Kind.PREFIXES
        for key in [k for k in on_host if _covers(prefix, k)]:
            item.absorb(on_host.pop(key))
            self.size -= 1
        files = self.files.get(netloc, {})
        for t in [t for t in files if _covers(prefix, _bare(t.value))]:
            item.absorb(files.pop(t))
            self.size -= 1
        on_host[prefix] = item
        self.size += 1
        return Kind.PREFIXES

    def _add_file(self, item: Pending) -> Kind:
        bare = _bare(item.target.value)
        netloc = _netloc(bare)
        host = self.hosts.get(netloc)
        if host is not None:
            host.absorb(item)
            return Kind.HOSTS
        for key, cover in self.prefixes.get(netloc, {}).items():
            if _covers(key, bare):
                cover.absorb(item)
                return Kind.PREFIXES
        self._merge(self.files.setdefault(netloc, {}), item.target, item)
        return Kind.FILES

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
            for key in list(table)[:limit]:
                out.append(table.pop(key))
        else:
            nested = self.files if kind is Kind.FILES else self.prefixes
            for netloc in list(nested):
                inner: dict[object, Pending] = nested[netloc]  # type: ignore[assignment]
                for item_key in list(inner):
                    if limit is not None and len(out) >= limit:
                        break
                    out.append(inner.pop(item_key))
                if not inner:
                    del nested[netloc]
        self.size -= len(out)
        return out


class Coalescer:
    def __init__(
        self, window_seconds: float, cap: Callable[[str, Kind], int], clock: Clock
    ) -> None:
        self._window = window_seconds
        self._cap = cap
        self._clock = clock
        self._buckets: dict[tuple[str, Mode], _ZoneBucket] = {}
        self._full: set[tuple[str, Mode, Kind]] = set()

    @property
    def pending(self) -> int:
        return sum(b.size for b in self._buckets.values())

    def add(self, zone_id: str, mode: Mode, target: Target, owner: Owner) -> None:
        key = (zone_id, mode)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _ZoneBucket(self._clock.monotonic())
        kind = bucket.add(target, owner)
        if kind is Kind.EVERYTHING or bucket.count(kind) >= self._cap(zone_id, kind):
            self._full.add((zone_id, mode, kind))

    def next_due(self) -> float | None:
        """Monotonic time at which the oldest bucket's window ends (None when empty)."""
        if self._full:
            return self._clock.monotonic()
        starts = [b.first_at for b in self._buckets.values()]
        return min(starts) + self._window if starts else None

    def due(self) -> list[Batch]:
        """Batches ready now: full requests, and everything whose window has ended."""
        now = self._clock.monotonic()
        batches: list[Batch] = []
        for zone_id, mode, kind in sorted(self._full):
            bucket = self._buckets.get((zone_id, mode))
            if bucket is None:
                continue
            cap = self._cap(zone_id, kind)
            while bucket.count(kind) >= cap or (kind is Kind.EVERYTHING and bucket.everything):
                batches.append(Batch(zone_id, mode, kind, bucket.take(kind, cap)))
            if bucket.size == 0:
                del self._buckets[(zone_id, mode)]
        self._full.clear()
        for key, bucket in list(self._buckets.items()):
            if now - bucket.first_at >= self._window:
                batches.extend(self._drain(key, bucket))
        return batches

    def discard(self, drop: Callable[[Owner], bool]) -> int:
        """Forget pending work of owners for which ``drop`` is true (revoked partitions)."""
        removed = 0
        for key, bucket in list(self._buckets.items()):
            removed += bucket.discard(drop)
            if bucket.size == 0:
                del self._buckets[key]
        return removed

    def flush_all(self) -> list[Batch]:
        """Every pending target, now (shutdown and rebalance)."""
        batches: list[Batch] = []
        for key, bucket in list(self._buckets.items()):
            batches.extend(self._drain(key, bucket))
        self._full.clear()
        return batches

    def _drain(self, key: tuple[str, Mode], bucket: _ZoneBucket) -> list[Batch]:
        zone_id, mode = key
        batches = []
        for kind in Kind:
            cap = self._cap(zone_id, kind)
            while items := bucket.take(kind, cap):
                batches.append(Batch(zone_id, mode, kind, items))
        del self._buckets[key]
        return batches
