"""``purge-worker check``: validate the config and rules; ``--online`` also reaches Kafka and
verifies each account's API token."""

from __future__ import annotations

import argparse

from kafka import KafkaAdminClient
from kafka.errors import KafkaError

from worker.clock import SystemClock
from worker.config import Config
from worker.errors import PurgeWorkerError
from worker.observe import output
from worker.sending.accounts import Accounts


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--online", action="store_true", help="also reach Kafka and verify API tokens")


def run(args: argparse.Namespace, config: Config) -> int:
    output.line(
        f"{config.source}: OK: {len(config.rules.rules)} rules, {len(config.zones)} zones, "
        f"{len(config.accounts)} accounts, topics {', '.join(config.kafka.topics)}"
    )
    if not args.online:
        return 0
    failures = _check_kafka(config) + _check_tokens(config)
    for line in failures:
        output.line(f"FAIL {line}")
    if not failures:
        output.line("online: Kafka reachable, topics exist, every API token is active")
    return 1 if failures else 0


def _check_kafka(config: Config) -> list[str]:
    try:
        admin = KafkaAdminClient(
            **config.kafka.client_options(), request_timeout_ms=10_000, bootstrap_timeout_ms=10_000
        )
    except KafkaError as exc:
        return [
            f"kafka: cannot reach {','.join(config.kafka.bootstrap_servers)}: {type(exc).__name__}"
        ]
    try:
        existing = set(admin.list_topics())
    except KafkaError as exc:
        return [f"kafka: cannot list topics: {type(exc).__name__}"]
    finally:
        admin.close()
    wanted = [*config.kafka.topics, config.kafka.dead_letter_topic]
    return [f"kafka: topic {t} does not exist" for t in wanted if t not in existing]


def _check_tokens(config: Config) -> list[str]:
    accounts = Accounts(config, SystemClock())
    failures = []
    for name, client in accounts.clients.items():
        try:
            status = client.verify_token()
        except PurgeWorkerError as exc:
            failures.append(f"cloudflare.accounts.{name}: token check failed: {exc}")
            continue
        if status != "active":
            failures.append(f"cloudflare.accounts.{name}: token status is {status!r}, not active")
    accounts.close()
    return failures
