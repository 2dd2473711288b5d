"""The receipts topic on Kafka: writing receipts (following them into the purge ledger is
``worker.kafka.receipt_feed``; the format is ``worker.receipts``; ``trace`` reads them with
``worker.kafka.reader.scan``).

Receipts never hold the worker back. The writer queues within a bound and sends on a thread of its
own; when the topic is missing, unwritable or full, receipts are dropped with one warning (a lost
receipt only costs a repeat purge after a crash, never a missed one). The feed reads the topic
from a bounded time back, on its own thread, and hands the loop what the ledger should learn.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import structlog
from kafka.errors import KafkaError

from worker.config.settings import KafkaSettings
from worker.errors import PurgeWorkerError
from worker.kafka.admin import ensure_topic
from worker.kafka.client import (
    close_quietly,
    confirming_producer,
)
from worker.observe import metrics

log = structlog.get_logger("worker.kafka.receipts")

# Receipts waiting for the writer's thread; past it new ones are dropped (and counted).
MAX_QUEUED = 20_000
PARTITIONS = 6
TOPIC_CONFIG = {"cleanup.policy": "delete", "retention.ms": str(7 * 24 * 3600 * 1000)}
LAYOUT = "any number of partitions, time-based retention of at least the ledger's restore span"
# After a refusal or a missing topic, how long before the writer or the feed asks again.
RETRY_AFTER = 30.0
SEND_WAIT = 10.0


class KafkaReceiptSink:
    """Writes receipts to ``topic``. ``submit`` never blocks and never fails."""

    def __init__(
        self, config: KafkaSettings, topic: str, member: str = "", *, create: bool = True
    ) -> None:
        self._settings, self.topic, self._create = config, topic, create
        self.member = member
        self._cond = threading.Condition()
        self._queue: deque[tuple[bytes, bytes]] = deque()
        self._stopping = False
        self._sending = False  # a batch taken from the queue is being sent
        self._producer: Any = None
        self._thread = threading.Thread(target=self._run, name="receipts", daemon=True)
        self._thread.start()

    def submit(self, key: bytes, value: bytes) -> None:
        with self._cond:
            if len(self._queue) >= MAX_QUEUED or self._stopping:
                metrics.RECEIPTS.labels("dropped").inc()
                return
            self._queue.append((key, value))
            if len(self._queue) == 1:  # a writer busy sending finds the rest when it is back
                self._cond.notify()

    def written(self) -> bool:
        with self._cond:
            return not self._queue and not self._sending

    def close(self, timeout: float = 1.0) -> None:
        """Send what is queued within ``timeout``; the rest is lost (repeat purges at worst)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=0 if self._thread.is_alive() else max(0.0, timeout))
            except Exception as exc:  # noqa: BLE001 (the exit must not fail on a closing client)
                log.debug("receipts producer did not close cleanly", error=str(exc))

    def _run(self) -> None:
        # Connected before the first receipt, which then goes without waiting for it; what
        # fails here is tried (and told) again with that receipt.
        try:
            self._connect()
        except (KafkaError, PurgeWorkerError):
            self._discard()
        warned = ""
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                batch = list(self._queue)
                self._queue.clear()
                stopping = self._stopping
                self._sending = bool(batch)
            if batch:
                error = self._send(batch)
                with self._cond:
                    self._sending = False
                if error and error != warned:
                    log.warning(
                        "receipts not written; the worker goes on without them",
                        topic=self.topic,
                        error=error,
                    )
                elif not error and warned:
                    log.info("receipts written again", topic=self.topic)
                warned = error or ""
                if error:
                    self._pause(RETRY_AFTER)
            if stopping:
                return

    def _pause(self, seconds: float) -> None:
        """Wait before trying again; receipts that come meanwhile are dropped, not hoarded."""
        deadline = time.monotonic() + seconds
        with self._cond:
            while not self._stopping and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
                metrics.RECEIPTS.labels("dropped").inc(len(self._queue))
                self._queue.clear()

    def _send(self, batch: list[tuple[bytes, bytes]]) -> str | None:
        """Send ``batch``; None if all were confirmed, else why not."""
        futures = []
        why: str | None = None
        try:
            self._connect()
            for key, value in batch:
                futures.append(self._producer.send(self.topic, key=key, value=value))
            self._producer.flush(timeout=SEND_WAIT)
        except (KafkaError, PurgeWorkerError) as exc:
            self._discard()
            metrics.RECEIPTS.labels("failed").inc(len(batch) - len(futures))
            why = str(exc)
        ok = sum(1 for f in futures if f.is_done and not f.failed())
        metrics.RECEIPTS.labels("written").inc(ok)
        if ok < len(futures):
            metrics.RECEIPTS.labels("failed").inc(len(futures) - ok)
            failed = next((f for f in futures if f.is_done and f.failed()), None)
            why = why or (str(failed.exception) if failed is not None else "not confirmed in time")
            self._discard()
        return why

    def _connect(self) -> None:
        if self._producer is not None:
            return
        if self._create and ensure_topic(
            self._settings, self.topic, PARTITIONS, TOPIC_CONFIG, LAYOUT
        ):
            log.info("receipts topic created", topic=self.topic)
        self._producer = confirming_producer(
            self._settings, SEND_WAIT, 20, "cannot reach Kafka for the receipts topic"
        )

    def _discard(self) -> None:
        producer, self._producer = self._producer, None
        close_quietly(producer)
