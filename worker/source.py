"""Where records come from, as the pipeline sees it: a small interface and its Kafka version."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Protocol

import structlog
from kafka import AsyncConsumerRebalanceListener, KafkaConsumer, KafkaProducer
from kafka import TopicPartition as KafkaTP
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from worker.config import KafkaConfig
from worker.errors import RetryableError
from worker.events import Record
from worker.offsets import TopicPartition

log = structlog.get_logger("worker.source")


class Source(Protocol):
    def poll(self, timeout: float, max_records: int) -> list[Record]:
        """Records in offset order per partition; blocks up to ``timeout`` seconds."""

    def commit(self, offsets: dict[TopicPartition, int]) -> bool:
        """Commit ``offsets`` (the next offset to read); False if the group moved on meanwhile."""

    def pause(self) -> None:
        """Stop fetching from every assigned partition; ``poll`` keeps the membership alive."""

    def resume(self) -> None: ...

    def finished(self, offsets: dict[TopicPartition, int]) -> None:
        """Offsets that may be committed now (every record below them is finished): a
        rebalance commits these before the partitions change hands. Must not block."""

    def take_revoked(self) -> set[TopicPartition]:
        """Partitions lost to another member since the last call (revoked and not assigned
        back). Must not block."""

    def assignment(self) -> set[TopicPartition]: ...

    def total_partitions(self) -> int:
        """Partitions of every subscribed topic (for this replica's share of the budget)."""

    def lag(self, consumed: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        """Records behind the log end per partition, given the last consumed offsets."""

    def close(self) -> None: ...


def to_record(r: Any) -> Record:
    """A kafka-python ConsumerRecord as the pipeline's ``Record``."""
    headers = tuple(r.headers or ())
    return Record(r.topic, r.partition, r.offset, r.key, r.value, headers, r.timestamp)


class _Listener(AsyncConsumerRebalanceListener):  # type: ignore[misc]
    """Runs on kafka-python's event loop, which awaits it: it must never block, and awaits the
    one thing worth waiting for, the commit of finished records of revoked partitions, so the
    next owner does not purge them again.

    A partition counts as lost only once the next assignment is known and leaves it out: one that
    is revoked and handed straight back keeps its fetch position, so its records in flight stay
    ours (and if the client re-reads it from the committed offset instead, the pipeline sees the
    offset go backwards and starts the partition over).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.revoked: set[TopicPartition] = set()
        self.lost: set[TopicPartition] = set()
        self.finished: dict[TopicPartition, int] = {}
        self.consumer: KafkaConsumer | None = None

    async def on_partitions_revoked(self, revoked: Sequence[KafkaTP]) -> None:
        tps = {(tp.topic, tp.partition) for tp in revoked}
        with self.lock:
            self.revoked |= tps
            offsets = {tp: o for tp, o in self.finished.items() if tp in tps}
        if not offsets or self.consumer is None:
            return
        payload = {KafkaTP(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}
        try:
            await self.consumer.commit_async(payload)
            log.info(
                "committed finished records before handing partitions over",
                partitions=sorted(f"{t}[{p}]" for t, p in offsets),
            )
        except Exception as exc:  # noqa: BLE001 (redelivery, never loss: say so and go on)
            log.warning(
                "commit before handover failed; their new owner repeats them", error=str(exc)
            )

    async def on_partitions_assigned(self, assigned: Sequence[KafkaTP]) -> None:
        with self.lock:
            kept = {(tp.topic, tp.partition) for tp in assigned}
            self.lost |= self.revoked - kept
            self.lost -= kept
            self.revoked = set()
            self.finished = {tp: o for tp, o in self.finished.items() if tp in kept}


class KafkaSource:
    def __init__(self, config: KafkaConfig, **overrides: Any) -> None:
        self._config = config
        self._listener = _Listener()
        self._paused = False
        options = {
            **config.client_options(),
            "group_id": config.group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": config.auto_offset_reset,
            "max_poll_records": config.max_poll_records,
            "session_timeout_ms": 10_000,
            "heartbeat_interval_ms": 3_000,
            **overrides,
        }
        try:
            self._consumer = KafkaConsumer(**options)
        except KafkaError as exc:
            raise RetryableError(
                f"cannot reach Kafka at {','.join(config.bootstrap_servers)}: {exc}"
            ) from None
        self._listener.consumer = self._consumer
        self._consumer.subscribe(list(config.topics), listener=self._listener)

    def poll(self, timeout: float, max_records: int) -> list[Record]:
        batches = self._consumer.poll(timeout_ms=int(timeout * 1000), max_records=max_records)
        return [to_record(r) for records in batches.values() for r in records]

    def commit(self, offsets: dict[TopicPartition, int]) -> bool:
        owned = self.assignment()
        payload = {
            KafkaTP(t, p): OffsetAndMetadata(o, "", -1)
            for (t, p), o in offsets.items()
            if (t, p) in owned
        }
        if not payload:
            return True
        try:
            self._consumer.commit(payload)
            return True
        except CommitFailedError as exc:
            # The group rebalanced: those records will be redelivered (duplicates, never loss).
            log.warning("commit failed after a rebalance", error=str(exc))
            return False
        except KafkaError as exc:
            log.warning("commit failed", error=str(exc))
            return False

    def pause(self) -> None:
        tps = self._consumer.assignment()
        if tps:
            self._consumer.pause(*tps)
        self._paused = True

    def resume(self) -> None:
        tps = self._consumer.assignment()
        if tps:
            self._consumer.resume(*tps)
        self._paused = False

    def finished(self, offsets: dict[TopicPartition, int]) -> None:
        with self._listener.lock:
            self._listener.finished.update(offsets)

    def take_revoked(self) -> set[TopicPartition]:
        with self._listener.lock:
            revoked, self._listener.lost = self._listener.lost, set()
        if revoked and self._paused:
            # Newly assigned partitions start unpaused; keep the backpressure decision.
            self.pause()
        return revoked

    def assignment(self) -> set[TopicPartition]:
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def total_partitions(self) -> int:
        total = 0
        for topic in self._config.topics:
            parts = self._consumer.partitions_for_topic(topic)
            total += len(parts) if parts else 0
        return total

    def lag(self, consumed: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        out = {}
        for (topic, partition), offset in consumed.items():
            high = self._consumer.highwater(KafkaTP(topic, partition))
            if high is not None:
                out[(topic, partition)] = max(0, high - offset - 1)
        return out

    def close(self) -> None:
        # close() leaves the group, so the partitions move to another replica at once.
        self._consumer.close()


class KafkaDeadLetterSink:
    def __init__(
        self, config: KafkaConfig, topic: str | None = None, timeout: float = 30.0
    ) -> None:
        self._topic = topic or config.dead_letter_topic
        self._timeout = timeout
        try:
            self._producer = KafkaProducer(**config.client_options(), acks="all", linger_ms=5)
        except KafkaError as exc:
            raise RetryableError(f"cannot reach Kafka for the dead-letter topic: {exc}") from None

    def write(self, record: Record, headers: list[tuple[str, bytes]]) -> None:
        try:
            future = self._producer.send(
                self._topic, key=record.key, value=record.value, headers=headers
            )
            future.get(timeout=self._timeout)
        except KafkaError as exc:
            raise RetryableError(f"dead-letter write to {self._topic} failed: {exc}") from None

    def close(self) -> None:
        self._producer.close(timeout=10)
