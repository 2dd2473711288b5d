"""What ``check --online`` asks of the cluster before a deploy: can the worker reach it, and are
its topics there."""

from __future__ import annotations

from kafka import KafkaAdminClient
from kafka.errors import KafkaError

from worker.config.settings import KafkaSettings
from worker.kafka.client import options

WAIT_MS = 10_000


def check(settings: KafkaSettings) -> list[str]:
    """One line per problem found (empty: none)."""
    try:
        admin = KafkaAdminClient(
            **options(settings), request_timeout_ms=WAIT_MS, bootstrap_timeout_ms=WAIT_MS
        )
    except KafkaError as exc:
        servers = ",".join(settings.bootstrap_servers)
        return [f"kafka: cannot reach {servers}: {type(exc).__name__}"]
    try:
        existing = set(admin.list_topics())
    except KafkaError as exc:
        return [f"kafka: cannot list topics: {type(exc).__name__}"]
    finally:
        admin.close()
    wanted = [*settings.topics, settings.dead_letter_topic]
    return [f"kafka: topic {t} does not exist" for t in wanted if t not in existing]
