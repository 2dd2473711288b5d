"""Where records come from, as the pipeline sees it: a small interface and its Kafka version."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import structlog
from kafka import AsyncConsumerRebalanceListener, KafkaConsumer, KafkaProducer
from kafka import TopicPartition as KafkaTP
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from worker.config import KafkaConfig
from worker.errors import RetryableError
from worker.events import Record
from worker.outcome.dead_letters import Failed
from worker.outcome.offsets import TopicPartition

log = structlog.get_logger("worker.kafka.consumer")


class Source(Protocol):
    def poll(self, timeout: float, max_records: int) -> list[Record]:
        """Records in offset order per partition; blocks up to ``timeout`` seconds."""

    def commit(self, offsets: dict[TopicPartition, int], timeout: float) -> bool:
        """Commit ``offsets`` (the next offset to read), waiting at most ``timeout`` seconds;
        False if it failed or was not confirmed in time (the group moved on, Kafka is down)."""

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

    def rebalance_pending(self) -> bool:
        """The group is rebalancing and this member still holds partitions: they may be given
        up at any moment. Must not block."""

    def on_revoke(self, settle: Callable[[], bool]) -> None:
        """What a revocation calls, again and again for a short while, before it commits the
        finished records and lets the partitions go: ``settle`` collects ended requests and
        finishes their records (updating ``finished``), and says whether nothing is in flight
        any more. It is called from the Kafka client's thread while the pipeline's loop waits
        inside ``poll``; it must not block."""

    def last_contact(self) -> float | None:
        """Monotonic time Kafka was last heard from (None: not known yet)."""

    def total_partitions(self) -> int:
        """Partitions of every subscribed topic (for this replica's share of the budget)."""

    def lag(self, consumed: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        """Records behind the log end per partition, given the last consumed offsets."""

    def close(self, timeout: float = 10.0) -> None: ...


def kafka_offsets(offsets: dict[TopicPartition, int]) -> dict[KafkaTP, OffsetAndMetadata]:
    """Offsets to commit, as kafka-python's ``commit`` takes them."""
    return {KafkaTP(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}


def millis(seconds: float) -> int:
    """A kafka-python ``timeout_ms`` from seconds, never below 1 ms."""
    return max(1, int(seconds * 1000))


def to_record(r: Any) -> Record:
    """A kafka-python ConsumerRecord as the pipeline's ``Record``."""
    headers = tuple(r.headers or ())
    return Record(r.topic, r.partition, r.offset, r.key, r.value, headers, r.timestamp)


# How long a revocation waits for the pipeline's requests in flight to end, so their records
# finish and are committed before the partitions go. The group waits for it meanwhile.
HANDOVER_WAIT = 2.0
HANDOVER_STEP = 0.01


class _Listener(AsyncConsumerRebalanceListener):  # type: ignore[misc]
    """Runs on kafka-python's event loop, which awaits it: it must never block. On revocation it
    asks the pipeline to settle what it can (``settle``: True once nothing is in flight),
    between short sleeps on that loop (heartbeats go on), for at most ``HANDOVER_WAIT``; then it
    commits the finished records of the revoked partitions, so their next owner does not purge
    them again.

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
        self.settle: Callable[[], bool] | None = None

    async def _settle(self) -> None:
        coordinator = getattr(self.consumer, "_coordinator", None)
        sleep = getattr(getattr(coordinator, "_net", None), "sleep", None)
        if self.settle is None:
            return
        deadline = time.monotonic() + HANDOVER_WAIT
        while not self.settle() and sleep is not None and time.monotonic() < deadline:
            await sleep(HANDOVER_STEP)

    async def on_partitions_revoked(self, revoked: Sequence[KafkaTP]) -> None:
        tps = {(tp.topic, tp.partition) for tp in revoked}
        with self.lock:
            self.revoked |= tps
        if tps:
            try:
                await self._settle()
            except Exception:
                log.exception("settling before a handover failed")
        with self.lock:
            offsets = {tp: o for tp, o in self.finished.items() if tp in tps}
        if not offsets or self.consumer is None:
            return
        try:
            await self.consumer.commit_async(kafka_offsets(offsets))
            log.info(
                "committed finished records before handing partitions over",
                partitions=sorted(f"{t}[{p}]" for t, p in offsets),
            )
        except Exception as exc:  # noqa: BLE001 (redelivery, never loss: say so and go on)
            log.warning(
                "commit before handover failed; their new owner repeats them", error=str(exc)
            )

    async def on_partitions_assigned(self, assigned: Sequence[KafkaTP]) -> None:
        log.info(
            "partitions assigned",
            partitions=sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned),
        )
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
        self._heard_at: float | None = None

    def poll(self, timeout: float, max_records: int) -> list[Record]:
        batches = self._consumer.poll(timeout_ms=int(timeout * 1000), max_records=max_records)
        if batches:
            self._heard_at = time.monotonic()
        return [to_record(r) for records in batches.values() for r in records]

    def last_contact(self) -> float | None:
        # An idle member hears from the group coordinator every heartbeat (3 s); records and
        # commits count too. The heartbeat time is kafka-python's own (same monotonic clock),
        # read defensively: without it, records and commits still tell.
        coordinator = getattr(self._consumer, "_coordinator", None)
        heartbeat = getattr(getattr(coordinator, "heartbeat", None), "last_receive", None)
        times = [t for t in (heartbeat, self._heard_at) if isinstance(t, float)]
        times = [t for t in times if math.isfinite(t)]
        return max(times) if times else None

    def commit(self, offsets: dict[TopicPartition, int], timeout: float) -> bool:
        owned = self.assignment()
        payload = kafka_offsets({tp: o for tp, o in offsets.items() if tp in owned})
        if not payload:
            return True
        try:
            self._consumer.commit(payload, timeout_ms=millis(timeout))
            self._heard_at = time.monotonic()
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

    def rebalance_pending(self) -> bool:
        # kafka-python's heartbeat sets ``rejoin_needed`` when the coordinator answers that the
        # group is rebalancing; the revocation follows in the next poll. Read defensively (it is
        # the client's own attribute): without it, only the revocation's settling is left.
        coordinator = getattr(self._consumer, "_coordinator", None)
        if getattr(coordinator, "rejoin_needed", False) is not True:
            return False
        return bool(self._consumer.assignment())

    def on_revoke(self, settle: Callable[[], bool]) -> None:
        self._listener.settle = settle

    def total_partitions(self) -> int:
        total = 0
        for topic in self._config.topics:
            parts = self._consumer.partitions_for_topic(topic)
            total += len(parts) if parts else 0
        return total

    def missing_topics(self, names: Sequence[str]) -> list[str]:
        """Which of ``names`` the cluster does not have (asks the broker)."""
        try:
            existing = self._consumer.topics()
        except KafkaError as exc:
            raise RetryableError(f"cannot list Kafka topics: {exc}") from None
        return [n for n in names if n not in existing]

    def lag(self, consumed: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        out = {}
        for (topic, partition), offset in consumed.items():
            high = self._consumer.highwater(KafkaTP(topic, partition))
            if high is not None:
                out[(topic, partition)] = max(0, high - offset - 1)
        return out

    def close(self, timeout: float = 10.0) -> None:
        # close() leaves the group, so the partitions move to another replica at once. Its own
        # commit is off: only the pipeline commits, and only finished records. (A revocation on
        # the way out finds the hook answering at once: the pipeline is draining.)
        self._consumer.close(autocommit=False, timeout_ms=millis(timeout))


def recent_dead_letters(config: KafkaConfig, since: float, timeout: float = 5.0) -> list[float]:
    """When records of this worker's topics were dead-lettered since ``since`` (wall seconds),
    read from the dead-letter topic itself: it is durable, so a restarted worker knows what the
    one before it did."""
    from worker.outcome.dead_letters import PREFIX, header, parse_rfc3339  # noqa: PLC0415

    try:
        consumer = KafkaConsumer(
            **config.client_options(),
            group_id=None,
            enable_auto_commit=False,
            request_timeout_ms=int(timeout * 1000) + 1000,
        )
    except KafkaError as exc:
        raise RetryableError(f"cannot reach Kafka: {exc}") from None
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
        raise RetryableError(f"cannot read the dead-letter topic: {exc}") from None
    finally:
        consumer.close(autocommit=False, timeout_ms=1000)


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
    def __init__(self, config: KafkaConfig, topic: str | None = None) -> None:
        self._topic = topic or config.dead_letter_topic
        try:
            self._producer = KafkaProducer(
                **config.client_options(),
                acks="all",
                linger_ms=5,
                max_block_ms=SEND_BLOCK_MS,
                # A write the broker cannot take is retried by the pipeline, which holds the
                # record uncommitted meanwhile; the producer need not hold it for minutes.
                request_timeout_ms=10_000,
                delivery_timeout_ms=30_000,
            )
        except KafkaError as exc:
            raise RetryableError(f"cannot reach Kafka for the dead-letter topic: {exc}") from None

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
