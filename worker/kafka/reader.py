"""Reading a dead-letter topic back for ``replay``: a bounded scan under the replay's own group.

The scan stops at the end offsets seen when it started, so records dead-lettered again during a
replay (they land on the same topic) are not picked up again in the same run. Progress is
committed under the replay's own consumer group, so an interrupted replay resumes where it was.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kafka import KafkaConsumer
from kafka import TopicPartition as KafkaTP
from kafka.errors import KafkaError

from worker.config.settings import KafkaSettings
from worker.errors import UsageError
from worker.events import Record, TopicPartition
from worker.kafka.client import kafka_offsets, millis, options, to_record, unavailable
from worker.outcome.dead_letters import ReplayFilter, header, original


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
            parts = self._consumer.partitions_for_topic(topic)
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
