"""The worker's vocabulary for what it reads: a Kafka record, and the event the rules see.

Plug-in rules receive an ``Event`` (``worker.intake.decode`` makes it from a record).
"""

from __future__ import annotations

from typing import Any, NamedTuple

# A partition as the worker names it, independent of the Kafka client.
TopicPartition = tuple[str, int]


class Record(NamedTuple):
    """A Kafka record as the worker needs it, independent of the client library. (Tuples:
    one is made for every record read, and a frozen dataclass costs four times as much.)"""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int | None = None
    # For a dead letter being replayed: where the record first came from, and how many times it
    # has failed. Rules see the original topic; a new failure keeps the original coordinates.
    origin: Record | None = None
    attempts: int = 0


class Event(NamedTuple):
    """What the rules see: the event's fields plus where it came from."""

    body: dict[str, Any]
    format: str  # "cloudevents" (structured), "cloudevents-binary" or "json"
    id: str | None
    type: str | None
    time: float | None  # seconds since the epoch: the event's own time, else the record's
    topic: str
    partition: int
    offset: int
    key: str | None
    headers: dict[str, str]
    record_time: float | None = None  # the Kafka record's timestamp, in seconds
