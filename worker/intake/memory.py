"""An in-memory ``Source``, for fast tests of the logic around it. The contract tests run it and
the Kafka source through the same cases (``tests/test_source_contract.py``)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable

from worker.clock import Clock, SystemClock
from worker.events import Record, TopicPartition

# As the Kafka source's revocation: the hook again and again, for at most this long, in real
# time (requests in flight end in real time, whatever the loop's clock says).
HANDOVER_WAIT = 2.0
HANDOVER_STEP = 0.01


class InMemorySource:
    """Partitions as lists; ``add`` appends, ``poll`` reads on from each position (from
    ``committed``, as a member of a group that committed there before). Time passes only on the
    clock: an empty poll waits out its timeout there, so a mock clock makes the loop's tests
    deterministic. ``revoke`` makes the next poll run a revocation the way Kafka's client does,
    inside ``poll``."""

    def __init__(
        self,
        records: Iterable[Record] = (),
        *,
        clock: Clock | None = None,
        committed: dict[TopicPartition, int] | None = None,
    ) -> None:
        self.clock = clock or SystemClock()
        self.queues: dict[TopicPartition, list[Record]] = defaultdict(list)
        self.committed: dict[TopicPartition, int] = dict(committed or {})
        self.positions: dict[TopicPartition, int] = defaultdict(int, self.committed)
        self.paused = False
        self.pause_count = 0
        self.closed = False
        self.rebalancing = False
        self.settle: Callable[[], bool] | None = None
        self.finished_offsets: dict[TopicPartition, int] = {}
        self._revoking: set[TopicPartition] = set()
        self._back = False
        self._joining = False
        self._revoked: set[TopicPartition] = set()
        for r in records:
            self.add(r)

    def add(self, record: Record) -> None:
        self.queues[(record.topic, record.partition)].append(record)

    def revoke(
        self, tps: Iterable[TopicPartition], *, back: bool = False, joining: bool = False
    ) -> None:
        """The next ``poll`` gives ``tps`` up: it lets the hook settle, commits what is finished
        of them, and drops them from the assignment (``back``: they are assigned straight back,
        positions kept, as a rebalance that leaves them here does). ``joining``: that poll
        returns before the group answers (as Kafka's does when its timeout ends while the join
        is pending), so the rebalance is still on after it, until ``rebalancing`` is cleared."""
        self._revoking |= set(tps)
        self._back = back
        self._joining = joining

    def poll(self, timeout: float, max_records: int) -> list[Record]:
        if self._revoking:
            self._run_revocation()
        out: list[Record] = []
        for tp, queue in self.queues.items():
            while not self.paused and self.positions[tp] < len(queue) and len(out) < max_records:
                out.append(queue[self.positions[tp]])
                self.positions[tp] += 1
        if not out:
            # Like a real consumer, an empty poll waits out its timeout.
            self.clock.sleep(timeout)
        return out

    def _run_revocation(self) -> None:
        tps, self._revoking = self._revoking, set()
        deadline = time.monotonic() + HANDOVER_WAIT
        while self.settle is not None and not self.settle() and time.monotonic() < deadline:
            time.sleep(HANDOVER_STEP)
        self.commit({tp: o for tp, o in self.finished_offsets.items() if tp in tps}, 0.0)
        self.rebalancing = self.rebalancing or self._joining
        if self._back:
            return
        for tp in tps:
            self.queues.pop(tp, None)
            self.positions.pop(tp, None)
            self.finished_offsets.pop(tp, None)
        self._revoked |= tps

    def commit(self, offsets: dict[TopicPartition, int], timeout: float) -> bool:
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
        revoked, self._revoked = self._revoked, set()
        return revoked

    def assignment(self) -> set[TopicPartition]:
        return set(self.queues)

    def rebalance_pending(self) -> bool:
        return self.rebalancing

    def on_revoke(self, settle: Callable[[], bool]) -> None:
        self.settle = settle

    def last_contact(self) -> float | None:
        return self.clock.monotonic()

    def total_partitions(self) -> int:
        return len(self.queues)

    def lag(self, consumed: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        lags = {
            tp: len(self.queues[tp]) - off - 1 for tp, off in consumed.items() if tp in self.queues
        }
        for tp, queue in self.queues.items():
            if tp not in consumed:  # not read from yet: from where reading starts
                lags[tp] = len(queue) - self.positions[tp]
        return lags

    def close(self, timeout: float = 10.0) -> None:
        self.closed = True
