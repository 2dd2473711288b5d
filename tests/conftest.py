"""Session fixtures: one real Kafka broker for the whole run, fresh topics and groups per test."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from kafka import KafkaAdminClient
from kafka.admin import NewTopic

from scripts.kafka_broker import Broker, BrokerError


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """The bootstrap address of a real broker: ``KAFKA_BOOTSTRAP`` if set, else one we start.

    A broker that cannot start fails the tests that need it (an error, never a skip), so CI can
    not pass without having talked to real Kafka.
    """
    external = os.environ.get("KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    broker = Broker()
    try:
        broker.start()
    except BrokerError as exc:
        pytest.fail(f"could not start the Kafka broker for the tests: {exc}", pytrace=False)
    try:
        yield broker.bootstrap
    finally:
        broker.cleanup()


@pytest.fixture
def unique() -> str:
    """A short unique suffix for this test's topics and consumer groups."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def make_topic(kafka_bootstrap: str, unique: str) -> Iterator[object]:
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    created: list[str] = []

    def _make(name: str, partitions: int = 1) -> str:
        topic = f"{name}-{unique}"
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
        created.append(topic)
        return topic

    yield _make
    admin.close()


ZONE_A = "023e105f4ecef8ad9ca31a8372d0c353"
ZONE_B = "b" * 32
TOKEN = "test-token-5f1b8e2c9a"


@pytest.fixture
def emulator_factory():
    """Start emulators on free loopback ports; each is stopped after the test."""
    from worker.emulator import Emulator, EmulatorState

    started = []

    def _start(plan: str = "pro", zones: dict[str, str] | None = None, **kwargs) -> Emulator:
        accounts = kwargs.pop("accounts", {"acc": plan})
        state = EmulatorState(
            zones or {ZONE_A: "acc", ZONE_B: "acc"}, accounts, token=TOKEN, **kwargs
        )
        emu = Emulator(state).start()
        started.append(emu)
        return emu

    yield _start
    for emu in started:
        emu.stop()


@pytest.fixture
def emulator(emulator_factory):
    return emulator_factory()


@pytest.fixture(autouse=True)
def _no_worker_outlives_its_test() -> Iterator[None]:
    """A test that fails before it stops its workers must not leave them running: one whose
    broker is gone went on for half an hour beside the rest of the suite."""
    from tests.kafka_helpers import STARTED

    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


# Threads of the worker's Kafka clients (and of kafka-python's network): one left running
# after its test keeps reconnecting, and its backoff draws from ``random`` while a later
# Hypothesis test draws its examples, which Hypothesis reports as that test's failure.
KAFKA_THREADS = ("kafka-io-", "receipts", "dead-letters", "budget-exchange")
THREAD_GRACE = 5.0


def kafka_threads_since(before: set[threading.Thread]) -> list[str]:
    """The names of Kafka threads running now that were not in ``before``."""
    return [
        t.name
        for t in threading.enumerate()
        if t not in before and t.is_alive() and t.name.startswith(KAFKA_THREADS)
    ]


@pytest.fixture(autouse=True)
def no_kafka_thread_outlives_its_test() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREAD_GRACE
    while left := kafka_threads_since(before):
        if time.monotonic() > deadline:
            pytest.fail(f"Kafka threads still running {THREAD_GRACE:.0f} s after the test: {left}")
        time.sleep(0.05)
