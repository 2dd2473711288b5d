"""``purge-worker check``: validate the config and rules; ``--online`` also reaches Kafka and
verifies each account's API token."""

from __future__ import annotations

import argparse

from worker import app
from worker.clock import SystemClock
from worker.config.settings import Config
from worker.errors import PurgeWorkerError
from worker.kafka import admin
from worker.observe import output


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--online", action="store_true", help="also reach Kafka and verify API tokens")


def run(args: argparse.Namespace, config: Config) -> int:
    output.line(
        f"{config.source}: OK: {len(config.rules.rules)} rules, {len(config.zones)} zones, "
        f"{len(config.accounts)} accounts, topics {', '.join(config.kafka.topics)}"
    )
    if not args.online:
        return 0
    try:
        kafka = admin.check(config.kafka)
    except PurgeWorkerError as exc:
        kafka = [f"kafka: {exc}"]
    failures = kafka + _check_tokens(config)
    for line in failures:
        output.line(f"FAIL {line}")
    if not failures:
        output.line(
            "online: Kafka reachable, topics exist and the ACLs allow what the worker does; "
            "every API token is active"
        )
    return 1 if failures else 0


def _check_tokens(config: Config) -> list[str]:
    accounts = app.accounts(config, SystemClock())
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
