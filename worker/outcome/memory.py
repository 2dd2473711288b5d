"""An in-memory ``DeadLetterSink``, for fast tests of the logic around it."""

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
