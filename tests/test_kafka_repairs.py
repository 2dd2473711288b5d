"""kafka-python's faults that a broker outage brings out, mended (``worker.kafka.repairs``): a
client that cannot reach its broker keeps no socket of its failed attempts open, and one that
cannot start leaves no thread behind."""

import contextlib
import gc
import threading
import time
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer
from kafka.errors import KafkaError

from scripts.kafka_broker import free_port
from worker.kafka.repairs import close_failed_connects, stop_failed_starts


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


@pytest.mark.parametrize("make", [KafkaConsumer, KafkaAdminClient])
def test_a_client_that_cannot_start_leaves_no_thread_reconnecting(make):
    assert stop_failed_starts()
    before = set(threading.enumerate())
    for _ in range(3):  # as the receipts writer asks again while Kafka is away
        with pytest.raises(KafkaError):
            make(bootstrap_servers=f"127.0.0.1:{free_port()}", bootstrap_timeout_ms=300)
    left = [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not left, f"threads still running after the constructors failed: {left}"
