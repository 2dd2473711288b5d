"""The budget exchange's transport: every worker's demand reports on one Kafka topic.

Each worker writes a report per account four times a second (key ``<account>|<member>``, a small
JSON value) and reads everyone's, on a thread of its own, into a ``worker.sending.split.Board``.
Kafka is already what every worker of every group talks to, so no server of its own is needed:
any group on the same cluster that names the same topic and account takes part. The topic keeps
little (compacted, a minute's retention); a worker reads from the end, so old reports never
count, and a worker that stops cleanly leaves a tombstone so others take its budget at once.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import uuid
from collections.abc import Mapping
from typing import Any

import structlog
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka import errors as kafka_errors
from kafka.errors import KafkaError

from worker.clock import Clock
from worker.config.settings import KafkaSettings
from worker.errors import AccessError, PurgeWorkerError
from worker.kafka.admin import ensure_topic
from worker.kafka.client import learn_version, options
from worker.kafka.metadata import partitions_of
from worker.kafka.repairs import mend
from worker.sending.split import REPORT_INTERVAL, REPORT_TTL, Board, Demand, Report, news

log = structlog.get_logger("worker.kafka.exchange")

# Reports that stopped going out (or coming in) this long ago make the exchange unhealthy, so the
# worker falls back to partition shares before the others stop counting it (``REPORT_TTL``).
SILENT_AFTER = REPORT_TTL - 1.0
SEND_WAIT = 0.5
POLL_MS = 200  # a read returns as soon as a report arrives; spinning faster costs the consumer
FIRST_POLL_MS = 20
# After a refusal (an ACL, a topic that may not be created), how long before asking again.
DENIED_RETRY = 30.0
TOPIC_CONFIG = {
    "cleanup.policy": "compact,delete",
    "retention.ms": "60000",
    "segment.ms": "60000",
}


def member_id(group: str) -> str:
    """Unique per process, and readable in logs: group, host, pid."""
    return f"{group}/{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:6]}"


class KafkaBudgetExchange:
    """Publishes this worker's demand and reads everyone's. ``publish``, ``healthy`` and the
    board are safe to use from the worker's loop and never block."""

    def __init__(self, config: KafkaSettings, topic: str, clock: Clock) -> None:
        self._config = config
        self._topic = topic
        self._clock = clock
        self.member = member_id(config.group_id)
        self.board = Board()
        self._lock = threading.Lock()
        self._reports: dict[str, Report] = {}
        self._sent_ok = -1e18
        self.first_sent: float | None = None  # wall-clock time of the first report that went out
        # Whether the reader has read every report written before it started: until then, an
        # empty board proves nothing (see ``ShareKeeper``: a worker that hears nobody takes
        # the whole budget).
        self.caught_up = False
        self._ends: dict[TopicPartition, int] = {}
        # Where the first report landed, and whether the reader has read past it on a topic of
        # one partition: then every report written before it has been read (one log, in order),
        # so a worker that has heard nobody is alone without waiting for a delivery bound.
        self._first_at: tuple[int, int] | None = None
        self._single = False
        self.read_back = False
        self._read_ok = -1e18
        self._stop = threading.Event()
        self._due = threading.Event()  # a report the others act on waits to go out
        self._thread = threading.Thread(target=self._run, name="budget-exchange", daemon=True)
        # Writing has a thread of its own: the reader waits in its poll.
        self._sender = threading.Thread(target=self._send_loop, name="budget-send", daemon=True)
        self._producer: KafkaProducer | None = None
        self._consumer: KafkaConsumer | None = None

    def start(self) -> KafkaBudgetExchange:
        self._thread.start()
        self._sender.start()
        return self

    def publish(self, reports: Mapping[str, Report]) -> None:
        with self._lock:
            moved = any(news(self._reports.get(k), r) for k, r in reports.items())
            self._reports = dict(reports)
        if moved:  # at once, not at the next quarter second
            self._due.set()

    def healthy(self) -> bool:
        now = self._clock.time()
        with self._lock:
            return now - self._sent_ok < SILENT_AFTER and now - self._read_ok < SILENT_AFTER

    def close(self, timeout: float = 0.4) -> None:
        """Stop, and withdraw this worker's reports so the others take its budget at once."""
        self._stop.set()
        self._due.set()
        self._thread.join(timeout=timeout)
        self._sender.join(timeout=timeout)
        # Never raises: this runs on the way to the drain's final commit, and a broker that is
        # down (or just back) must not cost that commit or the exit code.
        producer = self._producer
        if producer is not None:
            try:
                with self._lock:
                    last = {k: r._replace(left=True) for k, r in self._reports.items()}
                self._write(producer, last, timeout)
            except KafkaError as exc:
                log.warning("could not withdraw budget reports", error=str(exc))
            try:
                producer.close(timeout=timeout)
            except KafkaError as exc:
                log.warning("budget exchange producer did not close cleanly", error=str(exc))
        if self._consumer is not None and not self._thread.is_alive():
            try:
                self._consumer.close()
            except KafkaError as exc:
                log.warning("budget exchange consumer did not close cleanly", error=str(exc))

    # -- the thread -------------------------------------------------------------------------------

    def _key(self, account: str) -> bytes:
        # One key per member and account: compaction keeps only each one's latest report.
        return f"{account}|{self.member}".encode()

    def _run(self) -> None:
        warned = ""
        while not self._stop.is_set():
            try:
                if self._producer is None:
                    self._ensure_topic()
                    self._producer = self._connect_producer()
                    self._due.set()  # the first report goes at once (``_send_loop``)
                if self._consumer is None:
                    self._consumer = self._connect_consumer()
                self._read(self._consumer)
                if warned:
                    log.info("budget exchange working again", topic=self._topic)
                warned = ""
            except (KafkaError, OSError, PurgeWorkerError) as exc:
                # Refused access does not change by asking four times a second: an operator
                # must grant it. Meanwhile the worker shares by partitions.
                denied = isinstance(exc, AccessError | kafka_errors.AuthorizationError)
                if str(exc) != warned:
                    log.warning("budget exchange unavailable", topic=self._topic, error=str(exc))
                    warned = str(exc)
                self._stop.wait(DENIED_RETRY if denied else REPORT_INTERVAL)

    def _send_loop(self) -> None:
        """Write the reports four times a second, and at once when they say something the
        others act on (``publish``) or when the first can go: a lone worker takes the whole
        budget only ``CUTOFF`` after it (``ShareKeeper``)."""
        warned = ""
        while not self._stop.is_set():
            self._due.wait(REPORT_INTERVAL)
            self._due.clear()
            producer = self._producer
            if producer is None or self._stop.is_set():
                continue
            try:
                self._send(producer)
                warned = ""
            except (KafkaError, OSError) as exc:  # the exchange turns unhealthy meanwhile
                if str(exc) != warned:
                    log.warning("budget reports not sent", topic=self._topic, error=str(exc))
                    warned = str(exc)

    def _connect_producer(self) -> KafkaProducer:
        """The writer, made first: the first report goes before the reader is set up, since a
        lone worker takes the whole budget only ``CUTOFF`` after it."""
        producer = KafkaProducer(**options(self._config), linger_ms=0, acks=1, max_block_ms=2000)
        learn_version(self._config, producer)
        mend(producer)  # cut off from Kafka, its sender waits instead of spinning
        # The topic's metadata now, while connecting, rather than in the first report's send.
        producer.partitions_for(self._topic)
        return producer

    def _connect_consumer(self) -> KafkaConsumer:
        """The reader of the budget topic (made by ``_ensure_topic`` if missing and this worker
        may: one partition, compacted; an admin's topic is used as it is)."""
        consumer = KafkaConsumer(**options(self._config), group_id=None, enable_auto_commit=False)
        parts = partitions_of(consumer, self._topic) or {0}
        tps = [TopicPartition(self._topic, p) for p in sorted(parts)]
        self._single = len(tps) == 1
        consumer.assign(tps)
        # From a few seconds back, not from the end: a starting worker must know at once who
        # else is spending the account (see ``ShareKeeper``: a worker that hears nobody may
        # take the budget without waiting for a boundary).
        since = int((self._clock.time() - REPORT_TTL) * 1000)
        starts = consumer.offsets_for_times(dict.fromkeys(tps, since))
        self._ends = consumer.end_offsets(tps)
        consumer.seek_to_end(*tps)
        for tp, found in starts.items():
            if found is not None:
                consumer.seek(tp, found.offset)
        return consumer

    def _ensure_topic(self) -> None:
        if ensure_topic(self._config, self._topic, 1, TOPIC_CONFIG, "one partition, compacted"):
            log.info("budget topic created", topic=self._topic)

    def _send(self, producer: KafkaProducer) -> None:
        with self._lock:
            reports = dict(self._reports)
        if reports:
            landed = self._write(producer, reports, SEND_WAIT)
            if self._first_at is None and landed:
                self._first_at = landed[0]
            with self._lock:
                self._sent_ok = self._clock.time()
                if self.first_sent is None:
                    self.first_sent = self._sent_ok

    def _write(
        self, producer: KafkaProducer, reports: dict[str, Report], wait: float
    ) -> list[tuple[int, int]]:
        """Send ``reports``; returns where each landed (partition, offset)."""
        at = round(self._clock.time(), 3)
        futures = []
        for account, r in reports.items():
            value = {
                "v": 1,
                "at": at,
                "urls": r.demand.urls,
                "flex": r.demand.flex,
                "epoch": r.epoch,
                "allowed": r.allowed,
                "left": r.left,
            }
            futures.append(
                producer.send(self._topic, key=self._key(account), value=json.dumps(value).encode())
            )
        producer.flush(timeout=wait)
        landed = []
        for future in futures:
            meta = future.get(timeout=0)  # raises what the send ran into
            landed.append((meta.partition, meta.offset))
        for account, r in reports.items():
            # The same figures the others read from the topic: every member splits alike.
            self.board.record(account, self.member, r._replace(at=at))
        return landed

    def _read(self, consumer: KafkaConsumer) -> None:
        # Until the first report is out, look for it often: it is waited for (``ShareKeeper``).
        wait = POLL_MS if self.first_sent is not None else FIRST_POLL_MS
        batches = consumer.poll(timeout_ms=wait, max_records=10_000)
        for records in batches.values():
            for r in records:
                self._take(r.key, r.value)
        if not self.caught_up:
            self.caught_up = all(consumer.position(tp) >= end for tp, end in self._ends.items())
        if not self.read_back and self._single and self._first_at is not None:
            partition, offset = self._first_at
            self.read_back = consumer.position(TopicPartition(self._topic, partition)) > offset
        with self._lock:
            self._read_ok = self._clock.time()

    def _take(self, key: bytes | None, value: bytes | None) -> None:
        try:
            account, member = (key or b"").decode().split("|", 1)
        except (UnicodeDecodeError, ValueError):
            return  # not a report of ours
        if member == self.member or value is None:
            return
        try:
            raw: Any = json.loads(value)
            epoch = raw["epoch"]
            report = Report(
                float(raw["at"]),
                Demand(float(raw["urls"]), float(raw["flex"])),
                None if epoch is None else int(epoch),
                float(raw["allowed"]),
                bool(raw["left"]),
            )
        except (ValueError, KeyError, TypeError):
            return
        figures = (report.at, *report.demand, report.allowed)
        if not all(math.isfinite(x) and x >= 0 for x in figures) or report.allowed > 1:
            return  # a report no worker writes: it would skew everyone's split
        self.board.record(account, member, report)
