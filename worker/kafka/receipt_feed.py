"""Following the receipts topic into the purge ledger: from a bounded time back at start, then as
receipts come, on a thread of its own; the loop takes what the ledger should learn. A worker given
partitions waits (briefly) until the feed has read what was written before (``mark``), so their
previous owner's last purges are known before their records meet the ledger.
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
from worker.kafka.client import connecting, options, translated
from worker.kafka.reader import seek_since
from worker.kafka.receipts import LAYOUT, PARTITIONS, RETRY_AFTER, TOPIC_CONFIG
from worker.receipts import LedgerKey, ledger_entries, member_marker, purge_of, read

log = structlog.get_logger("worker.kafka.receipt_feed")

POLL_MS = 100
# Caught up and with nobody waiting, the feed looks again after this long (or at once for a
# mark). Each look is a fetch round and a thread's wake beside a loop that may be busy: a
# backlog's own receipts, read back as they were written, cost its ingest a tenth. Learning
# another worker's purge a second later costs a repeat purge at worst.
FOLLOW_EVERY = 1.0
MAX_RECORDS = 5_000


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
        self._wake = threading.Event()  # a mark or the stop ends the feed's pause at once
        self._caught_up = threading.Event()
        # ``mark``'s events, each set once the feed has read what was written before it: with
        # the end offsets then, when the mark found them (else the feed asks).
        self._marks: list[tuple[threading.Event, dict[Any, int] | None]] = []
        # The partitions followed, once assigned, and how far each is read (and handed over).
        self._partitions: list[Any] = []
        self._read: dict[Any, int] = {}
        # False once the feed cannot read: marks are set at once. A feed that is starting reads
        # (or gives up) soon, so marks wait for it.
        self._reading = True
        self.restored = 0  # entries read up to the end the feed found at its start
        self._started = 0.0
        self._thread = threading.Thread(target=self._run, name="receipts-feed", daemon=True)

    def start(self) -> ReceiptFeed:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def mark(self) -> threading.Event:
        """An event set once every receipt written before this call is read (at once while the
        feed cannot read): a worker given partitions waits for it, so its ledger knows what their
        previous owner purged before their records meet it."""
        done = threading.Event()
        with self._lock:
            if not self._reading or self._stop.is_set():
                done.set()
                return done
            partitions = self._partitions
            if not partitions:  # still starting: the feed asks for the ends once it can
                self._marks.append((done, None))
                self._wake.set()
                return done
        # The feed's own client may be waiting on a fetch the broker holds (up to ``POLL_MS``),
        # and its end offsets would queue behind it: asked on a connection of their own they
        # come in a few ms, and a feed that has read them already sets the mark at once.
        threading.Thread(
            target=self._mark_at, args=(done, partitions), name="receipts-mark", daemon=True
        ).start()
        return done

    def _mark_at(self, done: threading.Event, partitions: list[Any]) -> None:
        try:
            ends: dict[Any, int] | None = end_offsets(self._settings, partitions)
        except (KafkaError, PurgeWorkerError):
            ends = None  # the feed's client asks them instead
        with self._lock:
            if (
                not self._reading
                or self._stop.is_set()
                or (ends is not None and _up_to(self._read, ends))
            ):
                done.set()
            else:
                self._marks.append((done, ends))
                self._wake.set()

    def take(self) -> list[tuple[LedgerKey, float]]:
        with self._lock:
            out = list(self._entries)
            self._entries.clear()
        return out

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._reading_now(False)

    def _restored_all(self) -> None:
        """Every receipt there was at start is read (and waits for the loop's ``take``)."""
        if not self._caught_up.is_set():
            self._caught_up.set()
            log.info(
                "purge ledger restored from receipts",
                entries=self.restored,
                seconds=round(time.monotonic() - self._started, 2),
            )

    def _reading_now(self, reading: bool) -> None:
        """Whether the feed can read; when it cannot, nobody waits for it."""
        with self._lock:
            self._reading = reading
            marks, self._marks = ([], self._marks) if reading else (self._marks, [])
        _set([done for done, _ in marks])

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
                self._reading_now(False)
                self._stop.wait(RETRY_AFTER)

    def _seek(self, consumer: Any) -> dict[Any, int]:
        """Seek to the span's start; a topic that is missing is made first (a fresh cluster's
        first worker reads receipts from the start, not from its first retry)."""
        with translated(f"cannot read {self.topic}"):
            ends = seek_since(consumer, self.topic, self._since)
        if ends is not None:
            return ends
        # The topic was not there after this worker started, so it holds no receipt from before
        # the start: nothing to restore, and no partition need wait for it to be made. What is
        # written meanwhile is followed like any later receipt.
        self._restored_all()
        self._reading_now(False)
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
                # A fetch that waits at the broker holds up end offsets asked on the same
                # connection: short waits keep a mark short when it could not ask them itself.
                fetch_max_wait_ms=POLL_MS,
            ),
            self._settings,
            "cannot reach Kafka for the receipts topic",
        )
        # Marks taken, each set once the feed has read up to its end offsets.
        waiting: list[tuple[threading.Event, dict[Any, int]]] = []
        try:
            ends = self._seek(consumer)
            self._note_read(consumer, ends)
            if _up_to(self._read, ends):
                self._restored_all()  # nothing in the span: no poll's wait for the first records
            self._reading_now(True)
            while not self._stop.is_set():
                with self._lock:
                    taken, self._marks = self._marks, []
                if taken:
                    if any(at is None for _, at in taken):  # what was written before them
                        with translated(f"cannot read {self.topic}"):
                            now = consumer.end_offsets(list(ends))
                    waiting += [(done, now if at is None else at) for done, at in taken]
                    waiting = _settle(waiting, self._read)  # read already: no poll's wait
                with translated(f"cannot read {self.topic}"):
                    batches = consumer.poll(timeout_ms=POLL_MS, max_records=MAX_RECORDS)
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
                self._note_read(consumer, ends)
                if not self._caught_up.is_set():
                    self.restored += len(entries)
                    if _up_to(self._read, ends):
                        self._restored_all()
                waiting = _settle(waiting, self._read)
                taken_all = sum(map(len, batches.values())) < MAX_RECORDS
                if self._caught_up.is_set() and not waiting and taken_all:
                    self._wake.wait(FOLLOW_EVERY)
                    self._wake.clear()
        finally:
            _set([done for done, _ in waiting])  # the feed stops reading them: nobody waits
            consumer.close(autocommit=False, timeout_ms=500)

    def _note_read(self, consumer: Any, ends: dict[Any, int]) -> None:
        """How far each partition is read, its receipts handed over (for ``mark``)."""
        read = {tp: consumer.position(tp) for tp in ends}
        with self._lock:
            self._partitions, self._read = list(ends), read


def end_offsets(settings: KafkaSettings, partitions: list[Any]) -> dict[Any, int]:
    """The end offsets of ``partitions`` now, asked by a client made for it."""
    consumer = connecting(
        lambda: KafkaConsumer(**options(settings), group_id=None, enable_auto_commit=False),
        settings,
        "cannot reach Kafka for the receipts topic",
    )
    try:
        with translated("cannot ask the receipts topic's end offsets"):
            ends: dict[Any, int] = consumer.end_offsets(partitions)
        return ends
    finally:
        consumer.close(autocommit=False, timeout_ms=0)


def _up_to(read: dict[Any, int], ends: dict[Any, int]) -> bool:
    """Every partition is read up to ``ends`` (the span's at start, or a mark's)."""
    return all(read.get(tp, -1) >= end for tp, end in ends.items())


def _settle(
    waiting: list[tuple[threading.Event, dict[Any, int]]], read: dict[Any, int]
) -> list[tuple[threading.Event, dict[Any, int]]]:
    """Set the marks whose ends are read; the others go on waiting."""
    left = []
    for done, ends in waiting:
        if _up_to(read, ends):
            done.set()
        else:
            left.append((done, ends))
    return left


def _set(events: list[threading.Event]) -> None:
    for done in events:
        done.set()
