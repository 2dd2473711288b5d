"""Builds the running worker from the settings: the stages of the loop, the Kafka clients, the
budget exchange, warming, metrics and probes. The only module besides the commands that knows
every piece.
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import structlog

from worker.clock import Clock
from worker.cloudflare.transport import RequestsTransport, Transport, dry_run
from worker.config.settings import Config
from worker.errors import ConfigError, PurgeWorkerError
from worker.events import Record
from worker.intake.source import Source
from worker.intake.stage import Intake
from worker.kafka.reader import recent_dead_letters
from worker.loop import Loop
from worker.observe.health import STALE_AFTER_SECONDS, HealthServer
from worker.outcome.commit import CommitPolicy
from worker.outcome.dead_letters import DeadLetterSink
from worker.outcome.guard import DeadLetterGuard
from worker.outcome.inflight import InFlightRecords
from worker.outcome.receipts import Receipts, ReceiptSink
from worker.outcome.stage import Outcome
from worker.outcome.warming import Warmer
from worker.pending.coalescer import Coalescer
from worker.pending.ledger import PurgeLedger
from worker.pending.stage import Learned, PendingTargets
from worker.planning.planner import Planner
from worker.planning.process import PlanningProcess
from worker.planning.stage import Planning
from worker.receipts import source_of
from worker.sending.accounts import Accounts
from worker.sending.dispatcher import Dispatcher
from worker.sending.purger import Purger
from worker.sending.shares import ShareKeeper
from worker.sending.split import Exchange
from worker.sending.stage import Sending

log = structlog.get_logger("worker.app")


def accounts(config: Config, clock: Clock, *, shadow: bool = False) -> Accounts:
    """Each account's client and rate limiter; ``shadow``: no request leaves the process (every
    purge is answered as accepted), for dry runs."""
    transport: Callable[[], Transport] = dry_run if shadow else RequestsTransport
    return Accounts(
        config.accounts, config.zones, clock, base_url=config.base_url, transport=transport
    )


def build_loop(
    config: Config,
    source: Source,
    sink: DeadLetterSink,
    clock: Clock,
    *,
    cloudflare: Accounts | None = None,
    exchange: Exchange | None = None,
    fixed_share: float | None = None,
    warmer: Warmer | None = None,
    process: PlanningProcess | None = None,
    receipts: ReceiptSink | None = None,
    learned: Learned | None = None,
) -> Loop:
    """The loop over ``source``, its stages built from ``config``. ``fixed_share``: this
    worker's part of each account's budget, whatever others do (replay); else it follows
    demand through ``exchange``, or the partitions. ``receipts``: where receipts go;
    ``learned``: what the ledger learns from them (the receipts feed)."""
    cloudflare = cloudflare or accounts(config, clock, shadow=config.delivery.dry_run)
    delivery, coalesce = config.delivery, config.coalesce
    records = InFlightRecords()
    coalescer = Coalescer(coalesce.window_seconds, cloudflare.cap, clock)
    ledger = PurgeLedger(coalesce.ledger)
    dispatcher = Dispatcher(
        coalescer,
        cloudflare.destinations,
        Purger(delivery.retry, clock),
        ledger,
        clock,
        concurrency=delivery.concurrency,
    )
    shares = ShareKeeper(cloudflare, clock, exchange=exchange, fixed=fixed_share)
    planner = None if process is not None else Planner(config.planning)
    return Loop(
        Intake(source, coalesce, clock, max_poll_records=config.kafka.max_poll_records),
        Planning(planner, process, _aged(clock, ledger.margin)),
        PendingTargets(coalescer, ledger, learned),
        Sending(dispatcher, shares, receipts=receipts is not None),
        Outcome(
            records,
            CommitPolicy(records, source, clock, delivery.commit_interval_seconds),
            sink,
            DeadLetterGuard(delivery.dead_letter_guard, clock),
            clock,
            warmer=warmer,
            receipts=_receipts(config, receipts),
            debug=config.observability.log_level == "debug",
        ),
        clock,
        delivery.drain_deadline_seconds,
    )


def _aged(clock: Clock, margin: float) -> Callable[[Sequence[Record]], bool]:
    """Whether records were all written longer than ``margin`` ago (by their Kafka times; one
    without a time, none or 0 as ``decode.record_time`` has it, says no)."""

    def aged(records: Sequence[Record]) -> bool:
        # Once per poll on the loop's thread: the look at each record is left to C.
        stamps = [record.timestamp_ms or 0 for record in records]
        return 0 not in stamps and max(stamps) / 1000 + margin <= clock.time()

    return aged


def _receipts(config: Config, sink: ReceiptSink | None) -> Receipts | None:
    if sink is None:
        return None
    source = source_of(config.kafka.group_id)
    return Receipts(sink, source, config.kafka.dead_letter_topic, sink.member)


# What the dead-letter topic says the guard's window held: (written at, window figures) per dead
# letter within it; None when it could not be read.
GuardSeed = list[tuple[float, str | None]] | None


def read_guard_seed(config: Config, clock: Clock) -> GuardSeed:
    """The dead letters written within the guard's window, for ``seed_guard`` (a round trip or
    more to the cluster: the worker reads them while it checks its access)."""
    settings = config.delivery.dead_letter_guard
    if settings.off:
        return []
    try:
        return recent_dead_letters(config.kafka, clock.time() - settings.window_seconds)
    except PurgeWorkerError as exc:
        log.warning("could not read the dead-letter topic's recent records", error=str(exc))
        return None


def seed_guard(guard: DeadLetterGuard, found: GuardSeed, clock: Clock) -> None:
    """Let the dead-letter guard go on from where the worker before this one was: the window's
    figures carried by the latest dead letter written within it (``read_guard_seed``). A worker
    restarted in a crash loop must not dead-letter another guard's worth on every start, nor
    trip on its predecessor's dead letters when the stream is under the limit."""
    if guard.off or not found:
        return
    windows = sorted((at, text) for at, text in found if text)
    if windows and guard.seed(windows[-1][1], clock.time() - windows[-1][0]):
        arrived, dead = guard.window()
        log.info("dead-letter guard: going on from the last run", arrived=arrived, dead=dead)
        if guard.inherited_over:
            log.warning(
                "the last run was stopped by the dead-letter guard: this one stops at its first "
                "dead letter within the window",
                arrived=arrived,
                dead=dead,
            )


def health(config: Config, loop: Loop, *, kafka_patience: float) -> HealthServer | None:
    """The probes: ``/healthz`` while the loop polls; ``/readyz`` while, besides, Kafka is heard
    from and dead letters can be written."""
    port = config.observability.health_port
    if not port:
        return None
    started = time.monotonic()
    source = loop.intake.source

    def check() -> tuple[bool, bool, dict[str, Any]]:
        status = loop.status
        fresh = time.time() - status.last_poll < STALE_AFTER_SECONDS
        healthy = status.running and fresh
        contact = source.last_contact()
        silent = time.monotonic() - (contact if contact is not None else started)
        writing = not loop.outcome.writes_failing
        details = {
            "assigned_partitions": status.assigned,
            "last_poll": status.last_poll,
            "last_record": status.last_record,
            "pending_records": len(loop.outcome.records),
            "kafka_silent_seconds": round(silent, 1),
            "dead_letters_writable": writing,
        }
        return healthy, healthy and silent < kafka_patience and writing, details

    with bound(config, "health_port"):
        server = HealthServer(port, check, config.observability.listen_address)
    return server.start()


@contextlib.contextmanager
def bound(config: Config, key: str) -> Iterator[None]:
    """A port that cannot be bound is a config error naming the key, not a traceback."""
    port = getattr(config.observability, key)
    try:
        yield
    except OSError as exc:
        address = config.observability.listen_address
        reason = (
            "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound: {exc.strerror}"
        )
        raise ConfigError(
            config.source, f"observability.{key}", f"port {port} on {address} {reason}"
        ) from None
