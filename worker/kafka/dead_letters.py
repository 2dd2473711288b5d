"""The dead-letter topic on Kafka: the writer the worker dead-letters through, and the reader
of its recent records that gives the dead-letter guard its memory across restarts."""

from __future__ import annotations

import time
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka import TopicPartition as KafkaTP
from kafka.errors import KafkaError

from worker.clock import parse_rfc3339
from worker.config.settings import KafkaSettings
from worker.errors import RetryableError
from worker.events import Record
from worker.kafka.client import options, unavailable
from worker.outcome.dead_letters import PREFIX, Failed, header

# How long a dead-letter send may wait for the topic's metadata. The producer's default is 60 s,
# and the loop waited that long per record when the topic was missing.
SEND_BLOCK_MS = 250


class _KafkaWrite:
    def __init__(self, future: Any, topic: str) -> None:
        self._future = future
        self._topic = topic

    def done(self) -> bool:
        return bool(self._future.is_done)

    def error(self) -> RetryableError | None:
        exc = self._future.exception if self._future.failed() else None
        if exc is None:
            return None
        return RetryableError(f"dead-letter write to {self._topic} failed: {exc}")


class KafkaDeadLetterSink:
    """``worker.outcome.dead_letters.DeadLetterSink`` on a Kafka topic."""

    def __init__(self, config: KafkaSettings, topic: str | None = None) -> None:
        self._topic = topic or config.dead_letter_topic
        try:
            self._producer = KafkaProducer(
                **options(config),
                acks="all",
                linger_ms=5,
                max_block_ms=SEND_BLOCK_MS,
                # A write the broker cannot take is retried by the loop, which holds the
                # record uncommitted meanwhile; the producer need not hold it for minutes.
                request_timeout_ms=10_000,
                delivery_timeout_ms=30_000,
            )
        except KafkaError as exc:
            raise unavailable("cannot reach Kafka for the dead-letter topic", exc) from None

    def submit(self, record: Record, headers: list[tuple[str, bytes]]) -> _KafkaWrite | Failed:
        try:
            future = self._producer.send(
                self._topic, key=record.key, value=record.value, headers=headers
            )
        except KafkaError as exc:
            return Failed(RetryableError(f"dead-letter write to {self._topic} failed: {exc}"))
        return _KafkaWrite(future, self._topic)

    def close(self, timeout: float = 10.0) -> None:
        self._producer.close(timeout=timeout)


def recent_dead_letters(config: KafkaSettings, since: float, timeout: float = 5.0) -> list[float]:
    """When records of this worker's topics were dead-lettered since ``since`` (wall seconds),
    read from the dead-letter topic itself: it is durable, so a restarted worker knows what the
    one before it did."""

    try:
        consumer = KafkaConsumer(
            **options(config),
            group_id=None,
            enable_auto_commit=False,
            request_timeout_ms=int(timeout * 1000) + 1000,
        )
    except KafkaError as exc:
        raise unavailable("cannot reach Kafka", exc) from None
    try:
        parts = consumer.partitions_for_topic(config.dead_letter_topic) or set()
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
        times: list[float] = []
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
                        times.append(failed)
                if consumer.position(tp) >= todo.get(tp, 0):
                    todo.pop(tp, None)
        return times
    except KafkaError as exc:
        raise unavailable("cannot read the dead-letter topic", exc) from None
    finally:
        consumer.close(autocommit=False, timeout_ms=1000)


class Republisher:
    """Puts records back on a topic for ``replay --mode republish``: each write confirmed before
    the next, so the replay commits only what is on the topic."""

    def __init__(self, config: KafkaSettings) -> None:
        try:
            self._producer = KafkaProducer(**options(config), acks="all", linger_ms=5)
        except KafkaError as exc:
            raise unavailable("cannot reach Kafka to republish", exc) from None

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: tuple[tuple[str, bytes], ...],
    ) -> None:
        """Write one record and wait for the broker's confirmation. Raises ``RetryableError``."""
        try:
            self._producer.send(topic, key=key, value=value, headers=list(headers)).get(timeout=30)
        except KafkaError as exc:
            raise unavailable("republish failed", exc) from None

    def close(self, timeout: float) -> None:
        self._producer.close(timeout=timeout)
