"""Dead-letter records: the original record unchanged, plus ``purge.*`` headers saying why; how
a dead letter is read back (its original coordinates, the replay's filters); and the interface
of what writes them (``DeadLetterSink``, on Kafka in ``worker.kafka.dead_letters``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from worker.clock import parse_rfc3339, rfc3339
from worker.errors import PermanentError, RetryableError
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
    """Where dead letters are written (``worker.kafka.dead_letters.KafkaDeadLetterSink``;
    ``worker.outcome.memory.InMemorySink`` in tests)."""

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


def headers_for(
    record: Record,
    errors: Sequence[PermanentError],
    *,
    failed_at: float,
    attempts: int = 1,
    original: Record | None = None,
    extra: dict[str, str] | None = None,
) -> list[tuple[str, bytes]]:
    """The dead-letter headers for ``record`` failed with ``errors`` (the first names the class).

    ``original`` is where the record first came from, when ``record`` is itself a dead letter
    being replayed: its ``purge.original.*`` coordinates are kept, not replaced. ``extra``: more
    ``purge.*`` headers (the guard's window).
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
    added.update(extra or {})
    # Error texts may quote what an API or proxy echoed back: never let a secret onto the topic.
    return kept + [(k, redact_text(v).encode("utf-8")) for k, v in added.items()]


def header(headers: Sequence[tuple[str, bytes]], name: str) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("utf-8", "replace")
    return None


def original(record: Record) -> Record:
    """The record as it was before it was dead-lettered: its topic, coordinates and headers."""
    h = record.headers

    def num(name: str, default: int) -> int:
        value = header(h, name)
        try:
            return int(value) if value else default
        except ValueError:
            return default

    origin = Record(
        header(h, "purge.original.topic") or record.topic,
        num("purge.original.partition", record.partition),
        num("purge.original.offset", record.offset),
        record.key,
        record.value,
        tuple((k, v) for k, v in h if not k.startswith(PREFIX)),
        num("purge.original.timestamp", record.timestamp_ms or 0) or None,
    )
    return Record(
        record.topic,
        record.partition,
        record.offset,
        record.key,
        record.value,
        origin.headers,
        record.timestamp_ms,
        origin=origin,
        attempts=num("purge.attempts", 1),
    )


@dataclass(frozen=True)
class ReplayFilter:
    """Which dead letters a replay takes: by class, failure time and original topic."""

    classes: frozenset[str] = frozenset()
    since: float | None = None
    until: float | None = None
    original_topic: str | None = None

    def accepts(self, headers: tuple[tuple[str, bytes], ...]) -> bool:
        if self.classes and header(headers, "purge.error.class") not in self.classes:
            return False
        if self.original_topic and header(headers, "purge.original.topic") != self.original_topic:
            return False
        if self.since is not None or self.until is not None:
            at = parse_rfc3339(header(headers, "purge.failed_at") or "")
            if at is None:
                return False
            if (self.since is not None and at < self.since) or (
                self.until is not None and at >= self.until
            ):
                return False
        return True


def describe(record: Record) -> dict[str, Any]:
    """A JSON-able line for ``--dry-run`` and logs."""
    origin = record.origin or record
    return {
        "dead_letter": f"{record.topic}[{record.partition}]@{record.offset}",
        "original": f"{origin.topic}[{origin.partition}]@{origin.offset}",
        "attempts": record.attempts,
        "key": record.key.decode("utf-8", "replace") if record.key else None,
    }
