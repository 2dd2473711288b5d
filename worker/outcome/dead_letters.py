"""Dead-letter records: the original record unchanged, plus ``purge.*`` headers saying why.

Also the guard that stops the worker when too large a share of records is being dead-lettered:
after a bad deploy, stopping beats emptying the whole topic into the dead-letter topic.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Protocol

from worker.clock import Clock
from worker.config.model import GuardSettings
from worker.errors import DeadLetterGuardTripped, PermanentError, RetryableError
from worker.events import Record
from worker.observe.logs import redact_text

PREFIX = "purge."
MAX_MESSAGE = 2000


class DeadLetterWrite(Protocol):
    """A dead-letter write under way."""

    def done(self) -> bool: ...

    def error(self) -> RetryableError | None:
        """Why it failed (once ``done``), or None if the broker confirmed it."""


class DeadLetterSink(Protocol):
    def submit(self, record: Record, headers: list[tuple[str, bytes]]) -> DeadLetterWrite:
        """Start writing one dead-letter record; never blocks for long. The record counts as
        dead-lettered only once the write is done without error."""

    def close(self, timeout: float = 10.0) -> None: ...


class Failed:
    """A write that failed before it started."""

    def __init__(self, error: RetryableError) -> None:
        self._error = error

    def done(self) -> bool:
        return True

    def error(self) -> RetryableError | None:
        return self._error


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def headers_for(
    record: Record,
    errors: Sequence[PermanentError],
    *,
    failed_at: float,
    attempts: int = 1,
    original: Record | None = None,
) -> list[tuple[str, bytes]]:
    """The dead-letter headers for ``record`` failed with ``errors`` (the first names the class).

    ``original`` is where the record first came from, when ``record`` is itself a dead letter
    being replayed: its ``purge.original.*`` coordinates are kept, not replaced.
    """
    first = errors[0]
    messages = [str(e) for e in errors[:3]]
    if len(errors) > 3:
        messages.append(f"and {len(errors) - 3} more")
    origin = original or record
    kept = [(k, v) for k, v in record.headers if not k.startswith(PREFIX)]
    added = {
        "purge.error.class": first.error_class,
        "purge.error.message": "; ".join(messages)[:MAX_MESSAGE],
        "purge.original.topic": origin.topic,
        "purge.original.partition": str(origin.partition),
        "purge.original.offset": str(origin.offset),
        "purge.original.timestamp": str(
            origin.timestamp_ms if origin.timestamp_ms is not None else ""
        ),
        "purge.attempts": str(attempts),
        "purge.failed_at": rfc3339(failed_at),
    }
    if first.code is not None:
        added["purge.error.code"] = str(first.code)
    # Error texts may quote what an API or proxy echoed back: never let a secret onto the topic.
    return kept + [(k, redact_text(v).encode("utf-8")) for k, v in added.items()]


def parse_rfc3339(text: str) -> float | None:
    """Wall seconds from a ``purge.failed_at`` value; None if it is not one."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def header(headers: Sequence[tuple[str, bytes]], name: str) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("utf-8", "replace")
    return None


class DeadLetterGuard:
    """Counts finished records in a sliding window; ``check`` raises before a write that would
    push the dead-lettered share over the limit."""

    def __init__(self, config: GuardSettings, clock: Clock) -> None:
        self._config = config
        self._clock = clock
        self._all: deque[float] = deque()
        self._dead: deque[float] = deque()

    def _trim(self, now: float) -> None:
        horizon = now - self._config.window_seconds
        for q in (self._all, self._dead):
            while q and q[0] < horizon:
                q.popleft()

    def seed(self, failed_at: Sequence[float], now_wall: float) -> None:
        """Count dead letters written by earlier runs (wall times) as if this run wrote them:
        the guard's window then spans restarts."""
        now = self._clock.monotonic()
        for t in sorted(failed_at):
            at = now - max(0.0, now_wall - t)
            self._all.append(at)
            self._dead.append(at)

    def record_ok(self) -> None:
        self._all.append(self._clock.monotonic())

    def check(self) -> None:
        """Call before a dead-letter write. Raises ``DeadLetterGuardTripped``."""
        if self._config.max_ratio >= 1.0:
            return
        now = self._clock.monotonic()
        self._trim(now)
        total = len(self._all) + 1
        dead = len(self._dead) + 1
        if total >= self._config.min_records and dead / total > self._config.max_ratio:
            raise DeadLetterGuardTripped(
                f"{dead} of the last {total} records within {self._config.window_seconds:.0f}s "
                f"would be dead-lettered (limit {self._config.max_ratio:.0%}): stopping instead. "
                "Check the rules, the zones and the token; tune delivery.dead_letter_guard."
            )

    def record_dead(self) -> None:
        now = self._clock.monotonic()
        self._all.append(now)
        self._dead.append(now)
