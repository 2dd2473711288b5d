"""kafka-python's faults that a broker outage brings out, mended (``worker.kafka.repairs``): a
client that cannot reach its broker keeps no socket of its failed attempts open, and one that
cannot start leaves no thread behind. And a cost of every poll: a group member whose
coordinator is known does not ask its network thread again."""

import contextlib
import gc
import threading
import time
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer
from kafka.errors import KafkaError

from scripts.kafka_broker import free_port
from tests.kafka_helpers import produce
from worker.kafka.repairs import close_failed_connects, known_coordinator, stop_failed_starts


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


def test_a_group_member_polls_without_asking_its_network_thread_for_a_known_coordinator(
    kafka_bootstrap, make_topic, unique
):
    """Each poll made sure of the coordinator on the network thread and waited for it; with
    the coordinator known and connected, the poll's own thread answers. Unknown, the network
    thread finds it as before."""
    topic = make_topic("repairs")
    produce(kafka_bootstrap, topic, [b"x"] * 5)
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=f"repairs-{unique}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    try:
        assert known_coordinator(consumer) and known_coordinator(consumer)  # once is enough
        coordinator = consumer._coordinator
        net, asked = coordinator._net, []
        real_run = net.run

        def run(fn, *args, **kwargs):
            asked.append(getattr(fn, "__name__", ""))
            return real_run(fn, *args, **kwargs)

        net.run = run
        read = 0
        deadline = time.monotonic() + 30
        while read < 5 and time.monotonic() < deadline:
            read += sum(len(r) for r in consumer.poll(timeout_ms=200).values())
        assert read == 5
        asked.clear()
        for _ in range(10):
            consumer.poll(timeout_ms=10)
        assert "ensure_coordinator_ready_async" not in asked, asked
        coordinator.coordinator_id = None  # as when its connection failed
        deadline = time.monotonic() + 10
        while coordinator.coordinator_id is None and time.monotonic() < deadline:
            consumer.poll(timeout_ms=100)
        assert "ensure_coordinator_ready_async" in asked, asked
        assert coordinator.coordinator_id is not None
    finally:
        consumer.close()
