"""What every Kafka client of the worker shares: connection options from the settings, records and
offsets translated to and from kafka-python's types, and its errors translated into the worker's.

Nothing outside ``worker.kafka`` imports kafka-python; this is where its vocabulary ends.
"""

from __future__ import annotations

from typing import Any

from kafka import TopicPartition as KafkaTP
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from worker.config.settings import KafkaSettings
from worker.errors import RetryableError
from worker.events import Record, TopicPartition

__all__ = ["KafkaError", "options", "unavailable"]


def options(settings: KafkaSettings) -> dict[str, Any]:
    """Connection options shared by the consumer, the producers and the admin client."""
    sec = settings.security
    opts: dict[str, Any] = {
        "bootstrap_servers": list(settings.bootstrap_servers),
        "client_id": settings.client_id,
        "security_protocol": sec.protocol,
    }
    if sec.sasl_mechanism:
        opts["sasl_mechanism"] = sec.sasl_mechanism
        opts["sasl_plain_username"] = sec.sasl_username
        password = settings.sasl_password
        opts["sasl_plain_password"] = password.reveal() if password else None
    if sec.ssl_cafile:
        opts["ssl_cafile"] = sec.ssl_cafile
    if sec.ssl_certfile:
        opts["ssl_certfile"] = sec.ssl_certfile
    if sec.ssl_keyfile:
        opts["ssl_keyfile"] = sec.ssl_keyfile
    return opts


def unavailable(doing: str, exc: KafkaError) -> RetryableError:
    """A kafka-python failure as the worker's error, naming what was being done."""
    return RetryableError(f"{doing}: {type(exc).__name__}: {exc}")


def kafka_offsets(offsets: dict[TopicPartition, int]) -> dict[KafkaTP, OffsetAndMetadata]:
    """Offsets to commit, as kafka-python's ``commit`` takes them."""
    return {KafkaTP(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}


def millis(seconds: float) -> int:
    """A kafka-python ``timeout_ms`` from seconds, never below 1 ms."""
    return max(1, int(seconds * 1000))


def to_record(r: Any) -> Record:
    """A kafka-python ConsumerRecord as the worker's ``Record``."""
    headers = tuple(r.headers or ())
    return Record(r.topic, r.partition, r.offset, r.key, r.value, headers, r.timestamp)
