"""Redaction: secrets from the config never reach a log line, whatever carries them; and a
client's warning said again and again does not flood the log."""

import io
import json
import logging
import time

from worker.config.load import parse
from worker.observe import logs


def test_sasl_password_and_token_are_redacted_everywhere():
    cfg = parse(
        {
            "kafka": {
                "topics": ["t"],
                "security": {
                    "protocol": "SASL_SSL",
                    "sasl_mechanism": "PLAIN",
                    "sasl_username": "u",
                    "sasl_password_env": "PW",
                },
            },
            "cloudflare": {
                "accounts": {"a": {"plan": "pro"}},
                "zones": [{"id": "a" * 32, "hosts": ["a.com"]}],
            },
            "rules": [{"name": "r", "urls": ["https://a.com/"]}],
        },
        "c.yaml",
        {"PW": "kafka-pass-123456", "CLOUDFLARE_API_TOKEN": "cf-token-abcdef"},
    )
    assert "kafka-pass" not in repr(cfg) and "cf-token" not in repr(cfg)
    logs.register_secrets(cfg.secrets())
    stream = io.StringIO()
    logs.configure("json", "debug", stream=stream)
    log = logs.structlog.get_logger("t")
    log.info("connecting", password="kafka-pass-123456", nested={"h": ["Bearer cf-token-abcdef"]})
    try:
        raise RuntimeError("auth failed for cf-token-abcdef")
    except RuntimeError:
        log.exception("boom")
    log.warning("err", error=ValueError("kafka-pass-123456 rejected"))
    text = stream.getvalue()
    assert "kafka-pass-123456" not in text and "cf-token-abcdef" not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines[0]["password"] == "***" and lines[0]["nested"] == {"h": ["Bearer ***"]}
    assert "***" in lines[1]["exception"]
    assert lines[2]["error"] == "ValueError: *** rejected"


def test_a_kafka_client_warning_said_again_and_again_is_held_back_and_counted():
    """With Write on the budget topic taken away mid-run, kafka-python's producer warned four
    times a second (tests/test_security_kafka.py). The first goes through, then one a minute
    with the count held back; other warnings, and the worker's own lines, are not held."""
    stream = io.StringIO()
    logs.configure("json", "info", stream=stream)
    client = logging.getLogger("kafka.producer.producer_batch")
    other = logging.getLogger("kafka.coordinator")
    start = time.time()

    def warn(logger, at, *args):
        record = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, *args, None)
        record.created = start + at
        logger.handle(record)

    failed = ("Failed to produce messages to %s: %s", ("budget-1[0]", "TopicAuthorizationFailed"))
    for i in range(120):  # four a second for 30 s
        warn(client, i / 4, *failed)
    warn(other, 1.0, "Heartbeat failed: %s", ("timeout",))
    logs.structlog.get_logger("worker").warning("budget reports not sent")
    warn(client, 60.5, *failed)
    warn(client, 61.0, *failed)
    warn(client, 10.0, "Failed to produce messages to %s: %s", ("receipts-1[2]", "Timeout"))
    # kafka-python passes its connections as arguments: each has a repr of its own, and the
    # same text (65 "Connection lost" lines from one 30 s broker outage).
    connections = [Connection() for _ in range(10)]
    for i, conn in enumerate(connections):
        warn(other, 2.0 + i / 10, "%s: Connection lost: %s", (conn, "socket disconnected"))
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert sum("Connection lost" in x["event"] for x in lines) == 1
    produce = [x for x in lines if x["event"].startswith("Failed to produce")]
    assert [x.get("held_back") for x in produce] == [None, 119, None]  # 120 said, 1 let by
    assert "receipts-1[2]" in produce[2]["event"]
    assert sum(x["event"].startswith("Heartbeat failed") for x in lines) == 1
    assert sum(x["event"] == "budget reports not sent" for x in lines) == 1
    # A line that cannot be formatted is the formatter's to report, never an error raised
    # into the client's thread.
    bad = other.makeRecord(other.name, logging.WARNING, __file__, 1, "%d", ("x",), None)
    assert logs._Repeats().filter(bad)


class Connection:
    def __str__(self) -> str:
        return "<KafkaConnection node_id=1 (disconnected)>"
