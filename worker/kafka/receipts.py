"""The receipts topic on Kafka: writing receipts, and following them into the purge ledger (the
format is ``worker.receipts``; ``trace`` reads them with ``worker.kafka.reader.scan``).

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
from kafka import KafkaConsumer
from kafka import errors as kafka_errors
from kafka.errors import KafkaError

from worker.config.settings import KafkaSettings
from worker.errors import AccessError, PurgeWorkerError
from worker.kafka.admin import ensure_topic
from worker.kafka.client import (
    close_quietly,
    confirming_producer,
    connecting,
    options,
    translated,
)
from worker.kafka.reader import seek_since
from worker.observe import metrics
from worker.receipts import LedgerKey, ledger_entries, member_marker, purge_of, read

log = structlog.get_logger("worker.kafka.receipts")

# Receipts waiting for the writer's thread; past it new ones are dropped (and counted).
MAX_QUEUED = 20_000
PARTITIONS = 6
TOPIC_CONFIG = {"cleanup.policy": "delete", "retention.ms": str(7 * 24 * 3600 * 1000)}
LAYOUT = "any number of partitions, time-based retention of at least the ledger's restore span"
# After a refusal or a missing topic, how long before the writer or the feed asks again.
RETRY_AFTER = 30.0
SEND_WAIT = 10.0
POLL_MS = 200


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
            if batch:
                error = self._send(batch)
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


class ReceiptFeed:
    """Follows the receipts topic from ``since`` (wall seconds) on a thread of its own; ``take``
    hands over what the purge ledger should learn (at most ``max_entries`` waiting: the oldest
    go first, as the ledger itself would drop them)."""

    def __init__(
        self, config: KafkaSettings, topic: str, since: float, max_entries: int, member: str = ""
    ) -> None:
        self._settings, self.topic, self._since = config, topic, since
        # This worker's own receipts tell its ledger nothing new: skipped before decoding.
        self._own = member_marker(member) if member else None
        self._entries: deque[tuple[LedgerKey, float]] = deque(maxlen=max_entries)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._caught_up = threading.Event()
        self.restored = 0  # entries read up to the end the feed found at its start
        self._thread = threading.Thread(target=self._run, name="receipts-feed", daemon=True)

    def start(self) -> ReceiptFeed:
        self._thread.start()
        return self

    def wait_caught_up(self, timeout: float) -> bool:
        """Wait until every receipt there was at start is read (or the feed gave up)."""
        return self._caught_up.wait(timeout)

    def take(self) -> list[tuple[LedgerKey, float]]:
        with self._lock:
            out = list(self._entries)
            self._entries.clear()
        return out

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        warned = ""
        while not self._stop.is_set():
            try:
                self._follow()
                return
            except (KafkaError, PurgeWorkerError) as exc:
                if isinstance(exc, kafka_errors.AuthorizationError):
                    exc = AccessError(f"not authorized to read {self.topic} (grant Read on it)")
                if str(exc) != warned:
                    log.warning(
                        "receipts not read; a restart may purge again what was purged",
                        topic=self.topic,
                        error=str(exc),
                    )
                    warned = str(exc)
                self._caught_up.set()  # nothing to wait for: start as without receipts
                self._stop.wait(RETRY_AFTER)

    def _seek(self, consumer: Any) -> dict[Any, int]:
        """Seek to the span's start; a topic that is missing is made first (a fresh cluster's
        first worker reads receipts from the start, not from its first retry)."""
        with translated(f"cannot read {self.topic}"):
            ends = seek_since(consumer, self.topic, self._since)
        if ends is not None:
            return ends
        # The topic was not there after this worker started, so it holds no receipt from before
        # the start: nothing to restore, and the loop need not wait for it to be made. What is
        # written meanwhile is followed like any later receipt.
        self._caught_up.set()
        if ensure_topic(self._settings, self.topic, PARTITIONS, TOPIC_CONFIG, LAYOUT):
            log.info("receipts topic created", topic=self.topic)
        deadline = time.monotonic() + 5.0
        while ends is None and time.monotonic() < deadline and not self._stop.is_set():
            self._stop.wait(0.2)  # the new topic's metadata reaches this client
            with translated(f"cannot read {self.topic}"):
                ends = seek_since(consumer, self.topic, self._since)
        if ends is None:
            raise PurgeWorkerError(f"{self.topic} does not exist")
        return ends

    def _follow(self) -> None:
        consumer = connecting(
            lambda: KafkaConsumer(
                **options(self._settings),
                group_id=None,
                enable_auto_commit=False,
            ),
            self._settings,
            "cannot reach Kafka for the receipts topic",
        )
        try:
            ends = self._seek(consumer)
            if _reached(consumer, ends):
                self._caught_up.set()  # nothing in the span: no poll's wait before the loop starts
            while not self._stop.is_set():
                with translated(f"cannot read {self.topic}"):
                    batches = consumer.poll(timeout_ms=POLL_MS, max_records=5_000)
                own = self._own
                purges = [
                    p
                    for records in batches.values()
                    for r in records
                    if r.value is not None
                    and (own is None or own not in r.value)
                    and (receipt := read(r.value)) is not None
                    and (p := purge_of(receipt))
                ]
                entries = ledger_entries(purges)
                if entries:
                    with self._lock:
                        self._entries.extend(entries)
                # Read from the earliest receipt of the span on: the last known is the newest.
                self._since = time.time() - 1.0
                if not self._caught_up.is_set():
                    self.restored += len(entries)
                    if _reached(consumer, ends):
                        self._caught_up.set()
        finally:
            consumer.close(autocommit=False, timeout_ms=500)


def _reached(consumer: Any, ends: dict[Any, int]) -> bool:
    """The feed has read every partition up to the end it found at its start."""
    return all(consumer.position(tp) >= end for tp, end in ends.items())
