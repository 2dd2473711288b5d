"""The Kafka source: the worker's consumer in its group, and the listener that hands partitions
over on a rebalance."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from kafka import AsyncConsumerRebalanceListener, KafkaConsumer
from kafka import TopicPartition as KafkaTP
from kafka import errors as kafka_errors
from kafka.errors import CommitFailedError, KafkaError

from worker.config.settings import KafkaSettings
from worker.errors import AccessError
from worker.events import Record, TopicPartition
from worker.kafka.client import connecting, kafka_offsets, millis, options, to_record

log = structlog.get_logger("worker.kafka")


# How long a revocation waits for the loop's requests in flight to end, so their records
# finish and are committed before the partitions go. The group waits for it meanwhile.
HANDOVER_WAIT = 2.0
HANDOVER_STEP = 0.01
# How long newly assigned partitions wait for the receipts feed (``_Listener._caught_up``): the
# first ones for the restore of the ledger's span (read while the worker joined its group), later
# ones for the receipts written since the feed's last poll.
RESTORE_WAIT = 15.0
CATCH_UP_WAIT = 2.0
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


class _Listener(AsyncConsumerRebalanceListener):  # type: ignore[misc]
    """Runs on kafka-python's event loop, which awaits it: it must never block. On revocation it
    asks the loop to settle what it can (``settle``: True once nothing is in flight),
    between short sleeps on that loop (heartbeats go on), for at most ``HANDOVER_WAIT``; then it
    commits the finished records of the revoked partitions, so their next owner does not purge
    them again.

    A partition counts as lost only once the next assignment is known and leaves it out: one that
    is revoked and handed straight back keeps its fetch position, so its records in flight stay
    ours (and if the client re-reads it from the committed offset instead, the loop sees the
    offset go backwards and starts the partition over).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.revoked: set[TopicPartition] = set()
        self.lost: set[TopicPartition] = set()
        self.finished: dict[TopicPartition, int] = {}
        self.consumer: KafkaConsumer | None = None
        self.settle: Callable[[], bool] | None = None
        self.catch_up: Callable[[], threading.Event] | None = None
        self.restoring = True  # no partitions yet: the first wait is the ledger's restore
        self.closing = False

    async def _wait_until(self, done: Callable[[], bool], seconds: float) -> bool:
        """Ask ``done`` between short sleeps on the client's event loop (heartbeats go on
        meanwhile) for at most ``seconds``; returns its last answer."""
        coordinator = getattr(self.consumer, "_coordinator", None)
        sleep = getattr(getattr(coordinator, "_net", None), "sleep", None)
        deadline = time.monotonic() + seconds
        while not (answer := done()) and sleep is not None and time.monotonic() < deadline:
            await sleep(HANDOVER_STEP)
        return answer

    async def _settle(self) -> None:
        if self.settle is not None:
            await self._wait_until(self.settle, HANDOVER_WAIT)

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
        if not offsets or self.consumer is None or self.closing:
            # Closing: the drain's own commit, bounded by its deadline, already went; one here
            # would wait out Kafka's request timeout when the broker cannot be reached.
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
            gained = kept - self.revoked
            self.lost |= self.revoked - kept
            self.lost -= kept
            self.revoked = set()
            self.finished = {tp: o for tp, o in self.finished.items() if tp in kept}
        if gained and self.catch_up is not None:
            wait, self.restoring = RESTORE_WAIT if self.restoring else CATCH_UP_WAIT, False
            await self._caught_up(self.catch_up(), wait)

    async def _caught_up(self, done: threading.Event, wait: float) -> None:
        """Wait (heartbeats going on, for at most ``wait``) until the receipts written before now
        are read: the partitions' previous owner wrote its last ones as it let them go, and their
        records, polled right after this, must meet a ledger that knows them."""
        started = time.monotonic()
        read = await self._wait_until(done.is_set, wait)
        waited = round(time.monotonic() - started, 3)
        if read:
            log.info("receipts read before the new partitions", seconds=waited)
        else:  # a repeat purge at worst, as without receipts
            log.warning(
                "receipts still unread after the wait; the new partitions' records go ahead",
                seconds=waited,
            )


class KafkaSource:
    """The worker's consumer: ``worker.intake.source.Source`` over its group's topics."""

    def __init__(self, config: KafkaSettings, **overrides: Any) -> None:
        self._config = config
        self._listener = _Listener()
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
        self._consumer.subscribe(list(config.topics), listener=self._listener)
        self._heard_at: float | None = None
        self._await_metadata(config.topics)

    def _await_metadata(self, topics: Sequence[str]) -> None:
        """Wait (at most ``METADATA_WAIT``) until the client knows the topics' partitions, which
        it asks for in the background once subscribed. kafka-python 3.0.12 joins the group at
        the first poll whether it knows them or not, and a leader that does not assigns
        nothing: a worker whose first poll came soon after it started read nothing for
        minutes. (Asking with ``partitions_for_topic`` instead fetches every topic's metadata,
        after which the group never finished rebalancing.)"""
        cluster = getattr(self._consumer, "_cluster", None)  # kafka-python's: read defensively
        deadline = time.monotonic() + METADATA_WAIT
        while (
            cluster is not None
            and any(cluster.partitions_for_topic(t) is None for t in topics)
            and time.monotonic() < deadline
        ):
            time.sleep(METADATA_STEP)

    def poll(self, timeout: float, max_records: int) -> list[Record]:
        """Raises ``AccessError`` when the group or a topic may not be read."""
        try:
            batches = self._consumer.poll(timeout_ms=int(timeout * 1000), max_records=max_records)
        except kafka_errors.AuthorizationError as exc:
            raise AccessError(
                f"group {self._config.group_id} on {', '.join(self._config.topics)}: not "
                f"authorized ({type(exc).__name__}): grant Read and Describe on the topics and "
                "the group"
            ) from None
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
            high = self._consumer.highwater(KafkaTP(topic, partition))
            if high is not None:
                out[(topic, partition)] = max(0, high - offset - 1)
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
