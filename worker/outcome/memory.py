"""In-memory twins of the dead-letter sink and the receipts sink, for fast tests of the logic
around them."""

from __future__ import annotations

from worker.errors import RetryableError
from worker.events import Record
from worker.outcome.dead_letters import Failed


class InMemorySink:
    """Keeps what it is given in ``records``; ``fail_next`` makes the next writes fail."""

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


class InMemoryReceipts:
    """A ``worker.outcome.receipts.ReceiptSink`` that keeps each receipt's key and value."""

    def __init__(self, member: str = "") -> None:
        self.member = member
        self.receipts: list[tuple[bytes, bytes]] = []

    def submit(self, key: bytes, value: bytes) -> None:
        self.receipts.append((key, value))

    def written(self) -> bool:
        return True

    def close(self, timeout: float = 1.0) -> None:
        pass
