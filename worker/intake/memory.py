"""In-memory stand-ins for the pipeline's seams, for fast tests of the logic around them.

The same behaviour is proven against the real Kafka broker by the integration tests.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

from worker.errors import RetryableError
from worker.events import Record
from worker.outcome.dead_letters import Failed
from worker.outcome.offsets import TopicPartition


class InMemorySource:
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


class InMemorySink:
    def __init__(self) -> None:
        self.records: list[tuple[Record, list[tuple[str, bytes]]]] = []
        self.fail_next = 0

    def submit(self, record: Record, headers: list[tuple[str, bytes]]) -> Failed | Done:
        if self.fail_next:
            self.fail_next -= 1
            return Failed(RetryableError("in-memory sink told to fail"))
        self.records.append((record, headers))
        return Done()

    def close(self, timeout: float = 10.0) -> None:
        pass


class Done:
    """A write the in-memory sink confirmed at once."""

    def done(self) -> bool:
        return True

    def error(self) -> None:
        return None
