"""The consumer's rebalance listener: on a revocation it lets the loop settle what it can and
commits the finished records of the partitions going; on an assignment it waits until the
receipts written before it are read."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import structlog
from kafka import AsyncConsumerRebalanceListener, KafkaConsumer
from kafka import TopicPartition as KafkaTP

from worker.events import TopicPartition
from worker.kafka.client import kafka_offsets

log = structlog.get_logger("worker.kafka")

# How long a revocation waits for the loop's requests in flight to end, so their records
# finish and are committed before the partitions go. The group waits for it meanwhile.
HANDOVER_WAIT = 2.0
HANDOVER_STEP = 0.01
# How long newly assigned partitions wait for the receipts feed (``Listener._caught_up``): the
# first ones for the restore of the ledger's span (read while the worker joined its group), later
# ones for the receipts written since the feed's last poll.
RESTORE_WAIT = 15.0
CATCH_UP_WAIT = 2.0


class Listener(AsyncConsumerRebalanceListener):  # type: ignore[misc]
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
        # While the source joins at start-up (``KafkaSource.join``), what is assigned is paused
        # (``held``): the group is joined and positions are learned, and nothing is fetched.
        self.hold = False
        self.held: set[KafkaTP] = set()

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

    async def on_partitions_lost(self, lost: Sequence[KafkaTP]) -> None:
        """This member was evicted (its session expired, e.g. cut off from Kafka): the group
        gave ``lost`` to others seconds ago, so no commit for them can succeed and their new
        owner is not waiting for our receipts. They are taken as revoked at once: kafka-python's
        default ran the revocation, which waited 2 s for requests in flight and then failed
        its commit while the rejoin waited ("listener ... took 2.003s")."""
        with self.lock:
            self.revoked |= {(tp.topic, tp.partition) for tp in lost}

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
            if self.hold and self.consumer is not None and assigned:
                self.consumer.pause(*assigned)
                self.held |= set(assigned)
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
