"""``purge-worker run``: consume, purge, dead-letter until SIGTERM/SIGINT; then drain and commit."""

from __future__ import annotations

import argparse
import signal
import threading
import time
from typing import Any

import structlog
from prometheus_client import start_http_server

from worker import metrics
from worker.clock import SystemClock
from worker.config import Config
from worker.errors import DeadLetterGuardTripped, RetryableError, UsageError
from worker.health import STALE_AFTER_SECONDS, HealthServer
from worker.pipeline import Pipeline
from worker.source import KafkaDeadLetterSink, KafkaSource
from worker.wiring import Accounts

log = structlog.get_logger("worker.run")
CONNECT_ATTEMPTS_SECONDS = 60.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="shadow mode: log purges, send none")


def run(args: argparse.Namespace, config: Config) -> int:
    if args.dry_run:
        from dataclasses import replace  # noqa: PLC0415

        config = replace(config, delivery=replace(config.delivery, dry_run=True))
    if not config.delivery.dry_run and config.missing_credentials():
        raise UsageError(config.missing_credentials()[0])
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if config.metrics_port:
        start_http_server(config.metrics_port, registry=metrics.REGISTRY)
    clock = SystemClock()
    source, sink = _connect(config, stop)
    if source is None or sink is None:
        return 0 if stop.is_set() else 1
    pipeline = Pipeline(config, source, sink, Accounts(config, clock), clock)
    health = _health(config, pipeline)
    log.info(
        "worker started",
        topics=list(config.kafka.topics),
        group=config.kafka.group_id,
        zones=[z.name for z in config.zones],
        dry_run=config.delivery.dry_run,
    )
    try:
        pipeline.run(stop)
    except DeadLetterGuardTripped as exc:
        log.error("stopping: dead-letter guard tripped", reason=str(exc))
        return 1
    finally:
        if health:
            health.stop()
    log.info("worker stopped")
    return 0


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


def _health(config: Config, pipeline: Pipeline) -> HealthServer | None:
    if not config.health_port:
        return None

    def check() -> tuple[bool, bool, dict[str, Any]]:
        status = pipeline.status
        fresh = time.time() - status.last_poll < STALE_AFTER_SECONDS
        healthy = status.running and fresh
        details = {
            "assigned_partitions": status.assigned,
            "last_poll": status.last_poll,
            "last_record": status.last_record,
            "pending_records": pipeline.pending_records,
        }
        return healthy, healthy, details

    return HealthServer(config.health_port, check).start()
