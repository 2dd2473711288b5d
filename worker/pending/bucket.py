"""One zone and mode's pending targets: duplicates collapse, and so do targets another pending
target covers (``everything`` the whole zone, a host its URLs and prefixes, a prefix the URLs
and longer prefixes under it: ``worker.pending.cover``). Every item remembers which records it
stands for (``Pending.owners``). Not thread-safe: only the loop's thread touches it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

from worker.pending.cover import bare, covers, netloc
from worker.targets import Kind, Target

Owner = Hashable


@dataclass(slots=True)
class Pending:
    """A pending item: its target, and the owners (records) whose targets it stands for, one
    entry per target (an owner may appear more than once); a record is purged once every item
    it owns has ended. A list, not a count per owner: tens of thousands of records wait in a
    burst, and a small dict per item costs four times as much."""

    target: Target
    owners: list[Owner] = field(default_factory=list)

    def join(self, owner: Owner) -> None:
        """One more target of ``owner`` rides on this item (a duplicate, or a covered one)."""
        self.owners.append(owner)

    def absorb(self, other: Pending) -> None:
        self.owners += other.owners


class ZoneBucket:
    """One zone and mode's pending targets, each kept once, merged into whatever pending
    item covers it."""

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
        if self.everything is not None:
            self.everything.join(owner)
            return
        kind = target.kind
        # URLs and tags, the targets a backlog repeats, join their pending item without making
        # one of their own first.
        if kind is Kind.FILES:
            self._add_file(target, owner)
        elif kind is Kind.TAGS:
            self._join(self.tags, target.value, target, owner)
        elif kind is Kind.EVERYTHING:
            self._add_everything(Pending(target, [owner]))
        elif kind is Kind.HOSTS:
            self._add_host(target, owner)
        else:
            self._add_prefix(Pending(target, [owner]))

    def _join(
        self,
        table: dict[str, Pending] | dict[Target, Pending],
        key: object,
        target: Target,
        owner: Owner,
    ) -> None:
        existing = table.get(key)  # type: ignore[call-overload]
        if existing is None:
            table[key] = Pending(target, [owner])  # type: ignore[index]
            self.size += 1
        else:
            existing.join(owner)

    def _add_everything(self, item: Pending) -> None:
        for pending in self._all():
            item.absorb(pending)
        self.hosts.clear()
        self.prefixes.clear()
        self.files.clear()
        self.tags.clear()
        self.everything = item
        self.size = 1

    def _add_host(self, target: Target, owner: Owner) -> None:
        host = target.value
        self._join(self.hosts, host, target, owner)
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

    def _add_file(self, target: Target, owner: Owner) -> None:
        path = bare(target.value)
        host_key = netloc(path)
        host = self.hosts.get(host_key)
        if host is not None:
            host.join(owner)
            return
        prefixes = self.prefixes.get(host_key)
        if prefixes:
            for key, cover in prefixes.items():
                if covers(key, path):
                    cover.join(owner)
                    return
        files = self.files.get(host_key)
        if files is None:
            files = self.files[host_key] = {}
        self._join(files, target, target, owner)

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
                pending.owners = [o for o in pending.owners if not drop(o)]
                if not pending.owners:
                    del table[key]
                    removed += 1
        if self.everything is not None:
            self.everything.owners = [o for o in self.everything.owners if not drop(o)]
            if not self.everything.owners:
                self.everything = None
                removed += 1
        for nested in (self.prefixes, self.files):
            for host in [n for n, t in nested.items() if not t]:
                del nested[host]
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
