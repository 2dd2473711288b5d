"""Reading topics back: for ``replay``, a bounded scan of a dead-letter topic under the replay's own
group; for the dead-letter guard, when recent records were dead-lettered (its memory across
restarts); for ``trace``, a time-bounded scan of the receipts topic.

The scan stops at the end offsets seen when it started, so records dead-lettered again during a
replay (they land on the same topic) are not picked up again in the same run. Progress is
committed under the replay's own consumer group, so an interrupted replay resumes where it was.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer
from kafka import TopicPartition as KafkaTP
from kafka import errors as kafka_errors
from kafka.errors import KafkaError

from worker.clock import parse_rfc3339
from worker.config.settings import KafkaSettings
from worker.errors import AccessError, PurgeWorkerError, UsageError
from worker.events import Record, TopicPartition
from worker.kafka.client import (
    connecting,
    kafka_offsets,
    millis,
    options,
    to_record,
    translated,
    unavailable,
)
from worker.kafka.metadata import partitions_of
from worker.outcome.dead_letters import PREFIX, ReplayFilter, header, original


@dataclass
class Counts:
    scanned: int = 0
    matched: int = 0
    skipped: int = 0
    replayed: int = 0
    failed_again: int = 0
    by_class: dict[str, int] = field(default_factory=dict)


class DeadLetterReader:
    """A ``worker.intake.source.Source`` over a dead-letter topic: yields matching records (as
    ``original()`` makes them) until the end offsets seen at start, or ``max_records``
    matches."""

    def __init__(
        self,
        config: KafkaSettings,
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
                **options(config),
                group_id=group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
            )
            parts = partitions_of(self._consumer, topic)
        except KafkaError as exc:
            raise unavailable(f"cannot read {topic}", exc) from None
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


def recent_dead_letters(
    config: KafkaSettings, since: float, timeout: float = 5.0
) -> list[tuple[float, str | None]]:
    """When records of this worker's topics were dead-lettered since ``since`` (wall seconds),
    and the guard's window each carried (``purge.guard.window``), read from the dead-letter topic
    itself: it is durable, so a restarted worker knows what the one before it did."""

    consumer = connecting(
        lambda: KafkaConsumer(
            **options(config),
            group_id=None,
            enable_auto_commit=False,
            request_timeout_ms=int(timeout * 1000) + 1000,
        ),
        config,
        "cannot reach Kafka",
    )
    try:
        parts = partitions_of(consumer, config.dead_letter_topic)
        tps = [KafkaTP(config.dead_letter_topic, p) for p in parts]
        if not tps:
            return []
        consumer.assign(tps)
        starts = consumer.offsets_for_times({tp: int(since * 1000) for tp in tps})
        ends = consumer.end_offsets(tps)
        todo = {}
        for tp in tps:
            found = starts.get(tp)
            if found is not None and found.offset < ends[tp]:
                consumer.seek(tp, found.offset)
                todo[tp] = ends[tp]
        times: list[tuple[float, str | None]] = []
        topics = set(config.topics)
        deadline = time.monotonic() + timeout
        while todo and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=200).items():
                for r in records:
                    headers = tuple(r.headers or ())
                    if header(headers, PREFIX + "original.topic") not in topics:
                        continue
                    failed = parse_rfc3339(header(headers, PREFIX + "failed_at") or "")
                    if failed is not None and failed >= since:
                        times.append((failed, header(headers, PREFIX + "guard.window")))
                if consumer.position(tp) >= todo.get(tp, 0):
                    todo.pop(tp, None)
        return times
    except kafka_errors.AuthorizationError:
        raise AccessError(
            f"not authorized to read {config.dead_letter_topic} (the dead-letter guard reads "
            "it back across restarts: grant Read and Describe on it)"
        ) from None
    except KafkaError as exc:
        raise unavailable("cannot read the dead-letter topic", exc) from None
    finally:
        consumer.close(autocommit=False, timeout_ms=1000)


def seek_since(consumer: Any, topic: str, since: float) -> dict[KafkaTP, int] | None:
    """Assign every partition of ``topic`` and seek to the first record at or after ``since``;
    returns the end offsets now (None: no such topic)."""
    parts = partitions_of(consumer, topic)
    if not parts:
        return None
    tps = [KafkaTP(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    starts = consumer.offsets_for_times(dict.fromkeys(tps, int(since * 1000)))
    ends: dict[KafkaTP, int] = consumer.end_offsets(tps)
    for tp in tps:
        found = starts.get(tp)
        consumer.seek(tp, found.offset if found is not None else ends[tp])
    return ends


def scan(
    config: KafkaSettings,
    topic: str,
    since: float,
    keep: Callable[[bytes], bool],
    *,
    progress: Callable[[int, int], None] | None = None,
    until: float | None = None,
) -> Iterator[tuple[int, bytes]]:
    """The values of ``topic``'s records from ``since`` up to ``until`` (wall seconds; None: the
    end there is now) for which ``keep`` (a cheap test on the raw bytes) holds, with their
    timestamps (ms). Both ends are found by the broker's time index, so the scan reads only the
    span. ``progress`` is told (records read, records in all) as the scan goes."""
    consumer = connecting(
        lambda: KafkaConsumer(
            **options(config),
            group_id=None,
            enable_auto_commit=False,
            check_crcs=False,
            max_partition_fetch_bytes=8 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
        ),
        config,
        f"cannot reach Kafka to read {topic}",
    )
    try:
        with translated(f"cannot read {topic}"):
            ends = seek_since(consumer, topic, since)
            if ends is None:
                raise PurgeWorkerError(f"{topic} does not exist on this cluster")
            if until is not None:
                stops = consumer.offsets_for_times(dict.fromkeys(ends, int(until * 1000) + 1))
                for tp, found in stops.items():
                    if found is not None:
                        ends[tp] = min(ends[tp], found.offset)
            todo = {tp: end for tp, end in ends.items() if consumer.position(tp) < end}
            total = sum(end - consumer.position(tp) for tp, end in todo.items())
            done = 0
            while todo:
                for tp, records in consumer.poll(timeout_ms=500, max_records=50_000).items():
                    end = todo.get(tp)
                    if end is None:
                        continue
                    for r in records:
                        if r.offset >= end:
                            break
                        if r.value is not None and keep(r.value):
                            yield r.timestamp, r.value
                    done += len(records)
                    if consumer.position(tp) >= end:
                        del todo[tp]
                        consumer.pause(tp)
                if progress is not None:
                    progress(min(done, total), total)
    finally:
        consumer.close(autocommit=False, timeout_ms=500)
