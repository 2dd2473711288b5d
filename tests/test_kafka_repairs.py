"""kafka-python's faults that a broker outage brings out, mended (``worker.kafka.repairs``): a
client that cannot reach its broker keeps no socket of its failed attempts open."""

import contextlib
import gc
import time
from pathlib import Path

from kafka import KafkaConsumer

from scripts.kafka_broker import free_port
from worker.kafka.repairs import close_failed_connects


def open_sockets() -> int:
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            count += fd.readlink().name.startswith("socket:")
    return count


def test_a_client_retrying_an_unreachable_broker_holds_no_socket_per_attempt():
    assert close_failed_connects()
    consumer = KafkaConsumer(
        "orders",
        bootstrap_servers=f"127.0.0.1:{free_port()}",
        api_version=(3, 0),
        reconnect_backoff_ms=10,
        reconnect_backoff_max_ms=50,
    )
    # As in the worker, whose collector runs seldom: nothing is freed by it here.
    gc.disable()
    try:
        before, attempts = open_sockets(), time.monotonic() + 2.0
        while time.monotonic() < attempts:
            consumer.poll(timeout_ms=100)
        after = open_sockets()
    finally:
        gc.enable()
        consumer.close()
    assert after - before <= 2, f"{after - before} sockets more after 2 s of failed attempts"
