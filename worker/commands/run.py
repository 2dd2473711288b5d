"""``purge-worker run``: consume, purge, dead-letter until SIGTERM/SIGINT; then drain and commit."""

from __future__ import annotations

import argparse
import contextlib
import errno
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import structlog
from prometheus_client import start_http_server

from worker import metrics
from worker.clock import SystemClock
from worker.commands import args as args_types
from worker.config import Config
from worker.errors import ConfigError, DeadLetterGuardTripped, RetryableError
from worker.health import STALE_AFTER_SECONDS, HealthServer
from worker.pipeline import Pipeline
from worker.source import KafkaDeadLetterSink, KafkaSource
from worker.wiring import Accounts

log = structlog.get_logger("worker.run")
CONNECT_ATTEMPTS_SECONDS = 60.0


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
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if config.metrics_port:
        with bound(config, "metrics_port"):
            start_http_server(
                config.metrics_port,
                addr=config.observability.listen_address,
                registry=metrics.REGISTRY,
            )
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

    with bound(config, "health_port"):
        server = HealthServer(config.health_port, check, config.observability.listen_address)
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
