"""A memo bounded in entries and in the targets its entries hold.

The planning caches key by what an event's rules read and keep what they made of it. A count of
entries alone does not bound their memory: one entry may hold one target or ten thousand. So each
memo also counts the targets (its entries' weight) and starts over when either bound is reached.
Starting over rather than evicting one by one keeps a hit to one dict look-up; in a backlog the
entries that matter come back within seconds and are remembered again.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class Memo(Generic[V]):
    def __init__(self, max_entries: int, max_weight: int, weight: Callable[[V], int]) -> None:
        if max_entries < 1 or max_weight < 1:
            raise ValueError("a memo needs room for at least one entry")
        self.max_entries, self.max_weight = max_entries, max_weight
        self._weigh = weight
        self._entries: dict[Hashable, V] = {}
        self.weight = 0
        self.restarts = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> V | None:
        return self._entries.get(key)

    def put(self, key: Hashable, value: V) -> None:
        """Remember ``value``; an entry heavier than the whole memo is not kept."""
        weight = self._weigh(value)
        if weight > self.max_weight:
            return
        old = self._entries.get(key)
        if old is not None:
            self.weight -= self._weigh(old)
        elif len(self._entries) >= self.max_entries or self.weight + weight > self.max_weight:
            self._entries = {}
            self.weight = 0
            self.restarts += 1
        self._entries[key] = value
        self.weight += weight
