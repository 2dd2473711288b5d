"""The Kafka source: the worker's consumer in its group (its rebalance listener is
``worker.kafka.handover``)."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from kafka import KafkaConsumer
from kafka import TopicPartition as KafkaTP
from kafka import errors as kafka_errors
from kafka.errors import CommitFailedError, KafkaError

from worker.config.settings import KafkaSettings
from worker.errors import AccessError
from worker.events import Record, TopicPartition
from worker.kafka.client import connecting, kafka_offsets, millis, options, to_record
from worker.kafka.handover import Listener
from worker.kafka.metadata import prompt_metadata
from worker.kafka.records import read_as_records

log = structlog.get_logger("worker.kafka")


# How long a new consumer waits for its topics' partitions before the first poll joins the
# group (a topic that does not exist is reported by the access check instead).
METADATA_WAIT = 2.0
# How long the broker may hold a fetch for records to come (Kafka's default is 500 ms). The
# client fetches from a node only once its previous fetch returned, and leaves out partitions
# whose records are not yet polled: at a backlog's end, those partitions waited out a fetch for
# the others, half a second in 2 of 5 runs (120,000 records, 3 partitions). An idle worker
# asks ten times a second instead of twice.
FETCH_WAIT_MS = 100
METADATA_STEP = 0.005
# The poll's timeout while ``join`` waits for the group and for what runs beside it (s).
JOIN_STEP = 0.005
# How long the lag of partitions not read from yet may wait for their end offsets, asked once per
# assignment (ms).
ENDS_WAIT_MS = 500


def _await_metadata(cluster: Any, topics: Sequence[str]) -> None:
    """Wait (at most ``METADATA_WAIT``) until the client knows the topics' partitions, which it
    asks for in the background once subscribed. kafka-python 3.0.12 joins the group at the
    first poll whether it knows them or not, and a leader that does not assigns nothing: a
    worker whose first poll came soon after it started read nothing for minutes. (Asking with
    ``partitions_for_topic`` instead fetches every topic's metadata, after which the group
    never finished rebalancing.)"""
    deadline = time.monotonic() + METADATA_WAIT
    while (
        cluster is not None
        and any(cluster.partitions_for_topic(t) is None for t in topics)
        and time.monotonic() < deadline
    ):
        time.sleep(METADATA_STEP)


class KafkaSource:
    """The worker's consumer: ``worker.intake.source.Source`` over its group's topics."""

    def __init__(self, config: KafkaSettings, **overrides: Any) -> None:
        self._config = config
        self._listener = Listener()
        self._paused = False
        settings = {
            **options(config),
            "group_id": config.group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": config.auto_offset_reset,
            "max_poll_records": config.max_poll_records,
            "session_timeout_ms": 10_000,
            "heartbeat_interval_ms": 3_000,
            "fetch_max_wait_ms": FETCH_WAIT_MS,
            **overrides,
        }
        servers = ",".join(config.bootstrap_servers)
        self._consumer = connecting(
            lambda: KafkaConsumer(**settings), config, f"cannot reach Kafka at {servers}"
        )
        self._listener.consumer = self._consumer
        # Its polls hand out the worker's records, read a batch at a time (``records``).
        self._as_records = read_as_records(self._consumer)
        self._heard_at: float | None = None
        # End offsets of the assigned partitions not read from yet, asked once per assignment.
        self._ends: dict[KafkaTP, int] = {}
        self._ends_asked: set[KafkaTP] = set()
        cluster = getattr(self._consumer, "_cluster", None)  # kafka-python's: read defensively
        with prompt_metadata(cluster):
            self._consumer.subscribe(list(config.topics), listener=self._listener)
            _await_metadata(cluster, config.topics)

    def poll(self, timeout: float, max_records: int) -> list[Record]:
        """Raises ``AccessError`` when the group or a topic may not be read."""
        batches = self._poll(timeout, max_records)
        if not batches:
            return []
        self._heard_at = time.monotonic()
        if self._as_records:
            return [r for records in batches.values() for r in records]
        return [to_record(r) for records in batches.values() for r in records]

    def _poll(self, timeout: float, max_records: int | None = None) -> dict[KafkaTP, list[Any]]:
        try:
            return self._consumer.poll(  # type: ignore[no-any-return]
                timeout_ms=int(timeout * 1000), max_records=max_records
            )
        except kafka_errors.AuthorizationError as exc:
            raise AccessError(
                f"group {self._config.group_id} on {', '.join(self._config.topics)}: not "
                f"authorized ({type(exc).__name__}): grant Read and Describe on the topics and "
                "the group"
            ) from None

    def join(self, done: Callable[[], bool], timeout: float) -> None:
        """Join the group and learn where each partition starts, fetching nothing, until
        ``done()`` (at most ``timeout`` seconds): start-up's other round trips (the access
        check, the guard's dead letters) run meanwhile, and the loop's first poll fetches at
        once. A join not finished by then goes on in that poll. Raises like ``poll``."""
        listener = self._listener
        with listener.lock:
            listener.hold = True  # what the group assigns meanwhile is paused (see Listener)
        deadline = time.monotonic() + timeout
        try:
            while not done() and time.monotonic() < deadline:
                for tp, records in self._poll(JOIN_STEP).items():
                    # Not expected (paused as assigned); kept all the same: read again later.
                    self._consumer.seek(tp, records[0].offset)
        finally:
            with listener.lock:
                listener.hold, held = False, listener.held
                listener.held = set()
            for tp in held & self._consumer.assignment():
                with contextlib.suppress(KeyError, KafkaError):
                    self._consumer.resume(tp)

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
        self._each_assigned(self._consumer.pause)
        self._paused = True

    def resume(self) -> None:
        self._each_assigned(self._consumer.resume)
        self._paused = False

    def _each_assigned(self, act: Callable[[KafkaTP], None]) -> None:
        # The client's own thread runs a rebalance: a partition in the assignment asked for a
        # moment ago may be gone (a worker cut off from its group lost them all and crashed).
        for tp in self._consumer.assignment():
            with contextlib.suppress(KeyError, KafkaError):
                act(tp)

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
        with self._listener.lock:
            if self._listener.revoked:  # revoked, and the next assignment not known yet
                return True
        coordinator = getattr(self._consumer, "_coordinator", None)
        if getattr(coordinator, "rejoin_needed", False) is not True:
            return False
        return bool(self._consumer.assignment())

    def on_revoke(self, settle: Callable[[], bool]) -> None:
        self._listener.settle = settle

    def on_assign(self, catch_up: Callable[[], threading.Event]) -> None:
        """Before the records of partitions new to this worker are polled, wait for the event
        ``catch_up()`` returns (the receipts feed's ``mark``)."""
        self._listener.catch_up = catch_up

    def total_partitions(self) -> int:
        total = 0
        for topic in self._config.topics:
            parts = self._consumer.partitions_for_topic(topic)
            total += len(parts) if parts else 0
        return total

    def lag(self, consumed: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        out = {}
        for (topic, partition), offset in consumed.items():
            try:
                high = self._consumer.highwater(KafkaTP(topic, partition))
            except KafkaError:  # no longer this worker's (revoked or lost): not its to report
                continue
            if high is not None:
                out[(topic, partition)] = max(0, high - offset - 1)
        assigned = self._consumer.assignment()
        unread = [tp for tp in assigned if (tp.topic, tp.partition) not in consumed]
        if unread:
            out.update(self._unread_lag(assigned, unread))
        return out

    def _unread_lag(
        self, assigned: set[KafkaTP], unread: list[KafkaTP]
    ) -> dict[TopicPartition, int]:
        """From where reading starts to the end, for partitions not read from yet. The client
        learns a partition's end only from the fetch it hands out, so a backlog spread over
        partitions, a poll's worth or less in each, never looked behind: its end offsets are
        asked once per assignment instead."""
        if not self._ends_asked <= assigned:  # a new assignment
            self._ends, self._ends_asked = {}, set()
        missing = [tp for tp in unread if tp not in self._ends_asked]
        if missing:
            self._ends_asked.update(missing)
            try:
                self._ends.update(self._consumer.end_offsets(missing, timeout_ms=ENDS_WAIT_MS))
            except KafkaError as exc:  # not known: counted once read from, as before
                log.debug("end offsets not known", error=str(exc))
        out = {}
        for tp in unread:
            try:
                end = self._consumer.highwater(tp)
                start = self._consumer.position(tp, timeout_ms=0)  # known once fetching began
            except KafkaError:
                continue  # revoked meanwhile, or no position yet
            end = self._ends.get(tp) if end is None else end
            if end is not None and start is not None:
                out[(tp.topic, tp.partition)] = max(0, end - start)
        return out

    def close(self, timeout: float = 10.0) -> None:
        """Leave the group within ``timeout``, so the partitions move to another replica at
        once. Commits nothing (only the loop commits, and only finished records: the revocation
        on the way out skips its own). Never raises."""
        self._listener.closing = True
        try:
            self._consumer.close(autocommit=False, timeout_ms=millis(timeout))
        except Exception as exc:  # noqa: BLE001 (the exit must not fail on a closing client)
            log.warning("the Kafka consumer did not close cleanly", error=str(exc))
