"""``purge-worker run``: consume, purge, dead-letter until SIGTERM/SIGINT; then drain and commit."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import structlog
from prometheus_client import start_http_server

from worker import app
from worker.clock import SystemClock
from worker.commands import args as args_types
from worker.config.settings import Config
from worker.errors import AccessError, DeadLetterGuardTripped, PurgeWorkerError, RetryableError
from worker.kafka import admin
from worker.kafka.consumer import KafkaSource
from worker.kafka.dead_letters import KafkaDeadLetterSink
from worker.kafka.exchange import KafkaBudgetExchange, member_id
from worker.kafka.receipt_feed import ReceiptFeed
from worker.kafka.receipts import KafkaReceiptSink
from worker.loop import Loop
from worker.observe import metrics
from worker.outcome.warming import Warmed, Warmer, WarmJob
from worker.planning.process import PlanningProcess, wanted
from worker.receipts import source_of, warm_receipt
from worker.runtime import tune_malloc

log = structlog.get_logger("worker.run")
CONNECT_ATTEMPTS_SECONDS = 60.0
# The consumer joins its group while the access check runs (``_clients``); past this, the check
# is waited for alone (its requests time out in 10 s each).
JOIN_WAIT = 30.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="shadow mode: log purges, send none")
    p.add_argument(
        "--metrics-port",
        type=args_types.port,
        help="serve /metrics here (overrides the config; 0: off)",
    )
    p.add_argument(
        "--health-port",
        type=args_types.port,
        help="serve /healthz, /readyz here (overrides the config; 0: off)",
    )


def run(args: argparse.Namespace, config: Config) -> int:
    if args.dry_run:
        config = replace(config, delivery=config.delivery.model_copy(update={"dry_run": True}))
    ports = {"metrics_port": args.metrics_port, "health_port": args.health_port}
    ports = {k: v or None for k, v in ports.items() if v is not None}
    if ports:
        config = replace(config, observability=config.observability.model_copy(update=ports))
    tune_malloc()  # before the fork: the planning process inherits it
    # Forked first, before any thread of this process exists (see worker.planning.process).
    process = PlanningProcess(config.planning).start() if wanted(config.delivery.planning) else None
    try:
        return _run(config, process)
    finally:
        if process is not None:
            process.close()


def _run(config: Config, process: PlanningProcess | None) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if config.observability.metrics_port:
        with app.bound(config, "metrics_port"):
            start_http_server(
                config.observability.metrics_port,
                addr=config.observability.listen_address,
                registry=metrics.REGISTRY,
            )
    clock = SystemClock()
    started = _start(config, process, stop, clock)
    if started is None:
        return 0 if stop.is_set() else 1
    loop, warmer, feed = started
    health = app.health(
        config, loop, kafka_patience=config.observability.ready_kafka_timeout_seconds
    )
    log.info(
        "worker started",
        topics=list(config.kafka.topics),
        group=config.kafka.group_id,
        zones=[z.name for z in config.zones],
        dry_run=config.delivery.dry_run,
    )
    code = 0
    try:
        loop.run(stop)
    except DeadLetterGuardTripped as exc:
        log.error("stopping: dead-letter guard tripped", reason=str(exc))
        code = 1
    if warmer is not None:
        warmer.close(timeout=0.3)  # what is still waiting is not warmed: best effort
    if feed is not None:
        feed.close()
    log.info("worker stopped")
    # Health answers until the very end; a purge request still on the wire (its read timeout
    # is 30 s) must not hold the process past the drain deadline: its record is uncommitted and
    # will be redelivered, so the process may end without it.
    if loop.sending.on_the_wire:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if health:
        health.stop()
    return code


def _start(
    config: Config, process: PlanningProcess | None, stop: threading.Event, clock: SystemClock
) -> tuple[Loop, Warmer | None, ReceiptFeed | None] | None:
    """The loop, connected and checked; None when stopped (or given up) before it could run.
    Raises ``PurgeWorkerError`` naming what stands in the way."""
    # The purge transport's HTTP library (~40 ms to import) loads while Kafka connects and the
    # group is joined, which mostly wait on the network: the loop needs it at its first purge.
    threading.Thread(
        target=importlib.import_module, args=("requests",), name="import-http", daemon=True
    ).start()
    exchange = None
    if config.kafka.budget_topic and not config.delivery.dry_run:
        # Started first: it connects while the consumer does, so the budget is there sooner.
        exchange = KafkaBudgetExchange(config.kafka, config.kafka.budget_topic, clock).start()
    # So is the receipts feed: the ledger is restored while the consumer joins its group.
    receipts, feed = _receipts(config, clock)

    def abandon() -> None:
        if exchange is not None:
            exchange.close()
        if feed is not None:
            feed.close()
        if receipts is not None:
            receipts.close(timeout=0.1)

    try:
        clients = _clients(config, stop, clock, feed)
    except PurgeWorkerError:
        abandon()
        raise
    if clients is None:
        abandon()
        return None
    source, sink, seed = clients
    warmer = None
    if config.warming.enabled and config.rules.warms and not config.delivery.dry_run:
        warmer = Warmer(config.warming, clock, _warm_receipts(config, receipts, clock)).start()
    loop = app.build_loop(
        config,
        source,
        sink,
        clock,
        exchange=exchange,
        warmer=warmer,
        process=process,
        receipts=receipts,
        learned=None if feed is None else feed.take,
    )
    # A stream its predecessor found over the limit stops this worker at its first dead letter,
    # before it purges anything again; a fixed deploy that dead-letters nothing goes on.
    app.seed_guard(loop.outcome.guard, seed, clock)
    return loop, warmer, feed


def _receipts(
    config: Config, clock: SystemClock
) -> tuple[KafkaReceiptSink | None, ReceiptFeed | None]:
    """The receipts writer, and the feed that restores the ledger from them, both started: the
    feed reads while the consumer joins its group, and the first partitions wait for it
    (``KafkaSource.on_assign``). None in a dry run: its purges never happened, and no worker's
    ledger may learn otherwise."""
    topic = config.kafka.receipts_topic
    if not topic or config.delivery.dry_run:
        return None, None
    member = member_id(config.kafka.group_id)
    sink = KafkaReceiptSink(config.kafka, topic, member)
    ledger = config.coalesce.ledger
    if not ledger.enabled:
        return sink, None
    since = clock.time() - ledger.restore_seconds
    return sink, ReceiptFeed(config.kafka, topic, since, ledger.max_entries, member).start()


def _warm_receipts(
    config: Config, sink: KafkaReceiptSink | None, clock: SystemClock
) -> Warmed | None:
    """Each warm request's answer as a receipt: ``trace`` shows whether the edge missed after
    the purge (it took effect) or still hit."""
    if sink is None:
        return None
    source, member = source_of(config.kafka.group_id), sink.member

    def warmed(job: WarmJob, status: int | None, cache: str) -> None:
        at = clock.time()
        receipt = warm_receipt(
            job.zone, job.url, job.headers, status, cache, at=at, source=source, member=member
        )
        sink.submit(*receipt)

    return warmed


def _clients(
    config: Config, stop: threading.Event, clock: SystemClock, feed: ReceiptFeed | None
) -> tuple[KafkaSource, KafkaDeadLetterSink, app.GuardSeed] | None:
    """The consumer, the dead-letter writer and the dead letters within the guard's window, once
    the cluster says the worker may do what it does there; None if stopped or given up."""
    source, sink = _connect(config, stop)
    if source is None or sink is None:
        return None
    if feed is not None:  # before the group is joined: its first partitions wait for the feed
        source.on_assign(feed.mark)
    # The access check and the guard's dead letters each ask the cluster a round trip or more;
    # meanwhile the consumer joins its group, fetching nothing until the check has said yes:
    # side by side, a backlog's first records come ~0.1 s sooner.
    with ThreadPoolExecutor(2, thread_name_prefix="start-up") as pool:
        seed = pool.submit(app.read_guard_seed, config, clock)
        access = pool.submit(_verify_access, config)
        try:
            try:
                source.join(lambda: access.done() or stop.is_set(), JOIN_WAIT)
            finally:
                access.result()  # its verdict first: it names what to grant
        except PurgeWorkerError:
            source.close(timeout=1.0)
            sink.close(timeout=1.0)
            raise
        return source, sink, seed.result()


def _verify_access(config: Config) -> None:
    """Stop now, naming the topic and the ACL, when the worker cannot work on this cluster; warn
    about what it can work without (the guard's memory, the budget exchange)."""
    problems = admin.verify(config.kafka, ask_create=False)
    for problem in problems:
        if not problem.fatal:
            log.warning("kafka access", problem=problem.line)
    fatal = [p.line for p in problems if p.fatal]
    if fatal:
        for line in fatal[1:]:
            log.error("kafka access", problem=line)
        servers = ",".join(config.kafka.bootstrap_servers)
        raise AccessError(f"{fatal[0]} (on {servers})")


def _connect(
    config: Config, stop: threading.Event
) -> tuple[KafkaSource | None, KafkaDeadLetterSink | None]:
    """Connect to Kafka, retrying for a while: a broker that restarts with the worker is normal."""
    deadline = time.monotonic() + CONNECT_ATTEMPTS_SECONDS
    delay = 1.0
    while not stop.is_set():
        try:
            return KafkaSource(config.kafka), KafkaDeadLetterSink(config.kafka)
        except RetryableError as exc:
            if time.monotonic() >= deadline:
                log.error("giving up connecting to Kafka", error=str(exc))
                return None, None
            log.warning("Kafka not reachable yet; retrying", error=str(exc), retry_in=delay)
            stop.wait(delay)
            delay = min(delay * 2, 10.0)
    return None, None
