"""Reading a dead-letter topic back: filters, a bounded scan, and the two ways to re-drive.

The scan stops at the end offsets seen when it started, so records dead-lettered again during a
replay (they land on the same topic) are not picked up again in the same run. Progress is
committed under the replay's own consumer group, so an interrupted replay resumes where it was.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kafka import KafkaConsumer
from kafka import TopicPartition as KafkaTP
from kafka.errors import KafkaError

from worker.config import KafkaConfig
from worker.errors import RetryableError, UsageError
from worker.events import Record
from worker.kafka.consumer import kafka_offsets, millis, to_record
from worker.outcome.dead_letters import PREFIX, header
from worker.outcome.offsets import TopicPartition


def parse_time(text: str) -> float:
    """An RFC 3339 / ISO 8601 time (``2026-11-27T10:00:00Z``, or a date) as epoch seconds."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"{text!r} is not a time like 2026-11-27T10:00:00Z") from None
    if moment.tzinfo is None:
        raise UsageError(f"{text!r} has no time zone: add Z for UTC")
    return moment.timestamp()


@dataclass(frozen=True)
class ReplayFilter:
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
            failed = header(headers, "purge.failed_at")
            if failed is None:
                return False
            at = parse_time(failed)
            if (self.since is not None and at < self.since) or (
                self.until is not None and at >= self.until
            ):
                return False
        return True


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


@dataclass
class Counts:
    scanned: int = 0
    matched: int = 0
    skipped: int = 0
    replayed: int = 0
    failed_again: int = 0
    by_class: dict[str, int] = field(default_factory=dict)


class DeadLetterReader:
    """A ``Source`` over a dead-letter topic: yields matching records (as ``original()`` makes
    them) until the end offsets seen at start, or ``max_records`` matches."""

    def __init__(
        self,
        config: KafkaConfig,
        topic: str,
        group: str,
        flt: ReplayFilter,
        max_records: int | None = None,
    ) -> None:
        self.topic = topic
        self.filter = flt
        self.max_records = max_records
        self.counts = Counts()
        try:
            self._consumer = KafkaConsumer(
                **config.client_options(),
                group_id=group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
            )
            parts = self._consumer.partitions_for_topic(topic)
        except KafkaError as exc:
            raise RetryableError(f"cannot read {topic}: {type(exc).__name__}: {exc}") from None
        if not parts:
            raise UsageError(f"topic {topic} does not exist")
        self._tps = [KafkaTP(topic, p) for p in sorted(parts)]
        self._consumer.assign(self._tps)
        self._end = self._consumer.end_offsets(self._tps)
        self._start = {tp: self._consumer.position(tp) for tp in self._tps}
        self._done = {tp for tp in self._tps if self._start[tp] >= self._end[tp]}
        self._paused = False

    @property
    def total(self) -> int:
        """Records to scan (from each partition's position to its end at start)."""
        return sum(max(0, self._end[tp] - self._start[tp]) for tp in self._tps)

    @property
    def exhausted(self) -> bool:
        full = self.max_records is not None and self.counts.matched >= self.max_records
        return full or len(self._done) == len(self._tps)

    def poll(self, timeout: float, max_records: int) -> list[Record]:
        if self.exhausted or self._paused:
            # Manually assigned partitions need no heartbeats: waiting is all there is to do.
            time.sleep(timeout)
            return []
        batches = self._consumer.poll(timeout_ms=int(timeout * 1000), max_records=max_records)
        out: list[Record] = []
        for tp, records in batches.items():
            for r in records:
                if tp in self._done or r.offset >= self._end[tp]:
                    self._done.add(tp)
                    continue
                if r.offset + 1 >= self._end[tp]:
                    self._done.add(tp)
                if self.max_records is not None and self.counts.matched >= self.max_records:
                    self._done.add(tp)
                    continue
                self.counts.scanned += 1
                rec = to_record(r)
                if not self.filter.accepts(rec.headers):
                    self.counts.skipped += 1
                    continue
                self.counts.matched += 1
                cls = header(rec.headers, "purge.error.class") or "unknown"
                self.counts.by_class[cls] = self.counts.by_class.get(cls, 0) + 1
                out.append(original(rec))
        for tp in self._tps:
            if tp not in self._done and self._consumer.position(tp) >= self._end[tp]:
                self._done.add(tp)
        return out

    def commit(self, offsets: dict[TopicPartition, int], timeout: float = 10.0) -> bool:
        try:
            self._consumer.commit(kafka_offsets(offsets), timeout_ms=millis(timeout))
            return True
        except KafkaError:
            return False

    def commit_scanned(self) -> None:
        """Commit the scan position (records passed over by the filters included)."""
        positions = {(tp.topic, tp.partition): self._consumer.position(tp) for tp in self._tps}
        self.commit(positions)

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def finished(self, offsets: dict[TopicPartition, int]) -> None:
        """Nothing to do: the replay owns its partitions alone and commits as it scans."""

    def take_revoked(self) -> set[TopicPartition]:
        return set()

    def assignment(self) -> set[TopicPartition]:
        return {(tp.topic, tp.partition) for tp in self._tps}

    def rebalance_pending(self) -> bool:
        return False  # assigned by hand: no group to rebalance

    def on_revoke(self, settle: Callable[[], bool]) -> None:
        """Nothing is ever revoked: no group."""

    def last_contact(self) -> float | None:
        return None

    def total_partitions(self) -> int:
        return len(self._tps)

    def lag(self, consumed: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        return {}

    def close(self, timeout: float = 10.0) -> None:
        self._consumer.close(autocommit=False, timeout_ms=millis(timeout))


def describe(record: Record) -> dict[str, Any]:
    """A JSON-able line for ``--dry-run`` and logs."""
    origin = record.origin or record
    return {
        "dead_letter": f"{record.topic}[{record.partition}]@{record.offset}",
        "original": f"{origin.topic}[{origin.partition}]@{origin.offset}",
        "attempts": record.attempts,
        "key": record.key.decode("utf-8", "replace") if record.key else None,
    }
