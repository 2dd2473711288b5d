"""An in-memory ``Source``, for fast tests of the logic around it. The contract tests run it
and the Kafka source through the same cases (``tests/test_source_contract.py``)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

from worker.events import Record, TopicPartition


class InMemorySource:
    """Partitions as lists; ``add`` appends, ``poll`` reads on from each position."""

    def __init__(self, records: list[Record] | None = None) -> None:
        self.queues: dict[TopicPartition, list[Record]] = defaultdict(list)
        self.positions: dict[TopicPartition, int] = defaultdict(int)
        self.committed: dict[TopicPartition, int] = {}
        self.paused = False
        self.pause_count = 0
        self.revoked: set[TopicPartition] = set()
        self.closed = False
        self.rebalancing = False
        self.settle: Callable[[], bool] | None = None
        self.finished_offsets: dict[TopicPartition, int] = {}
        for r in records or []:
            self.add(r)

    def add(self, record: Record) -> None:
        self.queues[(record.topic, record.partition)].append(record)

    def poll(self, timeout: float, max_records: int) -> list[Record]:
        out: list[Record] = []
        for tp, queue in self.queues.items():
            while not self.paused and self.positions[tp] < len(queue) and len(out) < max_records:
                out.append(queue[self.positions[tp]])
                self.positions[tp] += 1
        if not out:
            # Like a real consumer, an empty poll waits out its timeout.
            time.sleep(timeout)
        return out

    def commit(self, offsets: dict[TopicPartition, int], timeout: float = 0.5) -> bool:
        self.committed.update(offsets)
        return True

    def pause(self) -> None:
        if not self.paused:
            self.pause_count += 1
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def finished(self, offsets: dict[TopicPartition, int]) -> None:
        self.finished_offsets.update(offsets)

    def take_revoked(self) -> set[TopicPartition]:
        revoked, self.revoked = self.revoked, set()
        return revoked

    def assignment(self) -> set[TopicPartition]:
        return set(self.queues)

    def rebalance_pending(self) -> bool:
        return self.rebalancing

    def on_revoke(self, settle: Callable[[], bool]) -> None:
        self.settle = settle

    def last_contact(self) -> float | None:
        return time.monotonic()

    def total_partitions(self) -> int:
        return len(self.queues)

    def lag(self, consumed: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        return {tp: len(self.queues[tp]) - off - 1 for tp, off in consumed.items()}

    def close(self, timeout: float = 10.0) -> None:
        self.closed = True
