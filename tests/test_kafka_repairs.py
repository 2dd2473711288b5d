"""kafka-python's faults that a broker outage brings out, mended (``worker.kafka.repairs``): a
client that cannot reach its broker keeps no socket of its failed attempts open, and one that
cannot start leaves no thread behind. And a cost of every poll: a group member whose
coordinator is known does not ask its network thread again, and a poll that has records does not
wait for the network thread to send the next fetch."""

import contextlib
import gc
import threading
import time
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from scripts.kafka_broker import free_port
from tests.kafka_helpers import produce
from worker.kafka.repairs import (
    close_failed_connects,
    known_coordinator,
    prompt_fetches,
    stop_failed_starts,
)


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


def test_a_poll_with_records_does_not_wait_for_the_next_fetch_to_be_sent(
    kafka_bootstrap, make_topic
):
    """A poll that empties what was fetched sends the next fetch before it returns, and waited
    for the network thread to send it; with the repair it hands its records over at once and the
    network thread sends the fetch meanwhile. A poll that found nothing still waits for its
    send (it waits for that fetch next)."""
    topic = make_topic("repairs")
    produce(kafka_bootstrap, topic, [b"x%d" % i for i in range(20)], partition=0)
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, max_poll_records=7)
    try:
        fetcher = consumer._fetcher
        manager = fetcher._manager
        # In order: what each look at the buffer found, and how each send went.
        events: list[tuple[str, int | str]] = []
        real_run, real_call_soon, real_fetched = (
            manager.run,
            manager.call_soon,
            fetcher.fetched_records,
        )

        def run(fn, *args):
            events.append(("awaited", getattr(fn, "__name__", "")))
            return real_run(fn, *args)

        def call_soon(fn, *args):
            events.append(("scheduled", getattr(fn, "__name__", "")))
            return real_call_soon(fn, *args)

        def fetched_records(*args, **kwargs):
            records, partial = real_fetched(*args, **kwargs)
            events.append(("found", sum(len(r) for r in records.values())))
            return records, partial

        manager.run, manager.call_soon = run, call_soon
        fetcher.fetched_records = fetched_records
        assert prompt_fetches(consumer) and prompt_fetches(consumer)  # once is enough
        consumer.assign([TopicPartition(topic, 0)])
        consumer.seek_to_beginning()
        got: list[bytes] = []

        def read_until(want: int) -> None:
            deadline = time.monotonic() + 30
            while len(got) < want and time.monotonic() < deadline:
                got.extend(r.value for rs in consumer.poll(timeout_ms=200).values() for r in rs)

        read_until(20)
        assert got == [b"x%d" % i for i in range(20)]
        produce(kafka_bootstrap, topic, [b"late"], partition=0)
        read_until(21)  # the fetches sent meanwhile went on: the new record came
        assert got[20:] == [b"late"]
        sends = [
            (how, events[i - 1][1])
            for i, (how, name) in enumerate(events)
            if name == "_send_fetches_async"
        ]
        assert sends, events
        assert all(found == 0 for how, found in sends if how == "awaited"), sends
        assert all(found > 0 for how, found in sends if how == "scheduled"), sends
        assert ("scheduled", 6) in sends, sends  # the poll that emptied the first fetch
    finally:
        consumer.close()
