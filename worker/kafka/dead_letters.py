"""Writing to Kafka for the outcome stage: the dead-letter writer, on a thread of its own, and
the republisher of ``replay --mode republish``."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import structlog
from kafka import KafkaProducer
from kafka.errors import KafkaError

from worker.config.settings import KafkaSettings
from worker.errors import PurgeWorkerError, RetryableError
from worker.events import Record
from worker.kafka.client import (
    close_quietly,
    confirming_producer,
    connecting,
    options,
    unavailable,
)

log = structlog.get_logger("worker.kafka")

# How long a batch of dead letters may wait for the topic's metadata and the broker's answer.
# The thread waits, never the loop: the records stay uncommitted meanwhile.
SEND_WAIT_MS = 10_000
# Writes waiting for the thread; past it a write fails at once and is offered again later.
MAX_QUEUED = 10_000


class _Write:
    """One dead-letter write: done once the broker confirmed it or it failed."""

    __slots__ = ("_done", "_error")

    def __init__(self) -> None:
        self._done = False
        self._error: RetryableError | None = None

    def done(self) -> bool:
        return self._done

    def error(self) -> RetryableError | None:
        return self._error

    def end(self, error: RetryableError | None = None) -> None:
        self._error, self._done = error, True


class KafkaDeadLetterSink:
    """``worker.outcome.dead_letters.DeadLetterSink`` on a Kafka topic. ``submit`` only queues:
    a thread of its own sends what is queued, waits for the topic's metadata and the broker's
    confirmation, and ends each write. After a failed batch the producer is built anew for the
    next: an idempotent producer stays broken after a fatal error (an authorization failure is
    one), and access granted later must work without a restart."""

    def __init__(self, config: KafkaSettings, topic: str | None = None) -> None:
        self._settings = config
        self._topic = topic or config.dead_letter_topic
        self._cond = threading.Condition()
        self._queue: deque[tuple[_Write, Record, list[tuple[str, bytes]]]] = deque()
        self._stopping = False
        # Built now: a worker that cannot reach Kafka, or is refused, says so at start.
        self._producer: Any = self._connect()
        self._thread = threading.Thread(target=self._run, name="dead-letters", daemon=True)
        self._thread.start()

    def submit(self, record: Record, headers: list[tuple[str, bytes]]) -> _Write:
        write = _Write()
        with self._cond:
            if len(self._queue) >= MAX_QUEUED or self._stopping:
                write.end(RetryableError(f"dead-letter writes to {self._topic} are backed up"))
            else:
                self._queue.append((write, record, headers))
                self._cond.notify()
        return write

    def close(self, timeout: float = 10.0) -> None:
        """Stop within ``timeout``; what is not confirmed by then stays undone (its record is
        uncommitted and comes back). Never raises."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=0 if self._thread.is_alive() else timeout)
            except Exception as exc:  # noqa: BLE001 (the exit must not fail on a closing client)
                log.warning("dead-letter producer did not close cleanly", error=str(exc))

    # -- the thread -------------------------------------------------------------------------------

    def _connect(self) -> Any:
        return confirming_producer(
            self._settings, SEND_WAIT_MS / 1000, 5, "cannot reach Kafka for the dead-letter topic"
        )

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                batch = list(self._queue)
                self._queue.clear()
            self._send(batch)

    def _send(self, batch: list[tuple[_Write, Record, list[tuple[str, bytes]]]]) -> None:
        futures = []
        try:
            if self._producer is None:
                self._producer = self._connect()
            for write, record, headers in batch:
                future = self._producer.send(
                    self._topic, key=record.key, value=record.value, headers=headers
                )
                futures.append((write, future))
            self._producer.flush(timeout=SEND_WAIT_MS / 1000)
        except (KafkaError, PurgeWorkerError) as exc:
            log.warning("dead-letter writes failed", topic=self._topic, error=str(exc))
        failed = False
        for write, future in futures:
            if future.is_done and not future.failed():
                write.end()
            else:
                failed = True
                cause = future.exception if future.is_done else "not confirmed in time"
                write.end(RetryableError(f"dead-letter write to {self._topic} failed: {cause}"))
        for write, _, _ in batch[len(futures) :]:
            failed = True
            write.end(RetryableError(f"dead-letter write to {self._topic} failed"))
        if failed:
            self._discard_producer()

    def _discard_producer(self) -> None:
        producer, self._producer = self._producer, None
        close_quietly(producer)


class Republisher:
    """Puts records back on a topic for ``replay --mode republish``: each write confirmed before
    the next, so the replay commits only what is on the topic."""

    def __init__(self, config: KafkaSettings) -> None:
        self._producer = connecting(
            lambda: KafkaProducer(**options(config), acks="all", linger_ms=5),
            config,
            "cannot reach Kafka to republish",
        )

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
