"""One contract, two sources: the in-memory ``Source`` the fast tests use and the Kafka source
production uses go through the same cases, so what the fast tests assume of the one holds for
the other."""

from __future__ import annotations

import time
import uuid

import pytest
from kafka import TopicPartition as KafkaTP

from tests.kafka_helpers import produce
from worker.config.load import parse
from worker.events import Record
from worker.intake.memory import InMemorySource
from worker.kafka.consumer import KafkaSource

PARTITIONS = 2
PER_PARTITION = 5


class Memory:
    """Records written to lists; a source of the same group starts where the last committed."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.committed: dict[tuple[str, int], int] = {}
        self.live: InMemorySource | None = None

    def write(self, topic: str, values: list[bytes]) -> None:
        for i, value in enumerate(values):
            p = i % PARTITIONS
            offset = sum(1 for r in self.records if r.partition == p)
            record = Record(topic, p, offset, b"k", value, (), 1)
            self.records.append(record)
            if self.live is not None:
                self.live.add(record)

    def open(self, topic: str, group: str):
        self.live = InMemorySource(self.records, committed=self.committed)
        return self.live

    def closed(self, source) -> None:
        self.committed = dict(source.committed)


class Kafka:
    def __init__(self, bootstrap: str, make_topic) -> None:
        self.bootstrap = bootstrap
        self.make_topic = make_topic

    def write(self, topic: str, values: list[bytes]) -> None:
        produce(self.bootstrap, topic, values, key=None, spread=PARTITIONS)

    def open(self, topic: str, group: str):
        config = parse(
            {
                "kafka": {
                    "bootstrap_servers": [self.bootstrap],
                    "topics": [topic],
                    "group_id": group,
                    "dead_letter_topic": f"{topic}.dlq",
                },
                "cloudflare": {
                    "accounts": {"a": {}},
                    "zones": [{"id": "0" * 32, "hosts": ["example.com"]}],
                },
            },
            "contract.yaml",
            {},
        )
        return KafkaSource(config.kafka)

    def closed(self, source) -> None:
        pass


@pytest.fixture(params=["memory", "kafka"])
def world(request):
    if request.param == "memory":
        return Memory(), "contract"
    bootstrap = request.getfixturevalue("kafka_bootstrap")
    make_topic = request.getfixturevalue("make_topic")
    return Kafka(bootstrap, make_topic), make_topic("contract", PARTITIONS)


def values(n: int, tag: str = "v") -> list[bytes]:
    return [f"{tag}{i}".encode() for i in range(n)]


def poll_until(source, want: int, seconds: float = 30.0, max_records: int = 500) -> list[Record]:
    """Poll until ``want`` records came (a Kafka consumer first joins its group)."""
    got: list[Record] = []
    deadline = time.monotonic() + seconds
    while len(got) < want and time.monotonic() < deadline:
        got += source.poll(0.2, max_records)
    return got


def test_every_record_once_in_offset_order_per_partition(world):
    w, topic = world
    w.write(topic, values(PARTITIONS * PER_PARTITION))
    source = w.open(topic, f"g-{uuid.uuid4().hex[:8]}")
    try:
        got = poll_until(source, PARTITIONS * PER_PARTITION)
        assert sorted(r.value for r in got) == sorted(values(PARTITIONS * PER_PARTITION))
        for p in range(PARTITIONS):
            offsets = [r.offset for r in got if r.partition == p]
            assert offsets == list(range(PER_PARTITION))
        assert all(r.topic == topic for r in got)
        assert source.poll(0.2, 500) == []  # nothing twice
        assert source.assignment() == {(topic, p) for p in range(PARTITIONS)}
        assert source.total_partitions() == PARTITIONS
    finally:
        source.close(1.0)


def test_lag_counts_the_partitions_not_read_from_yet(world):
    """A backlog spread over partitions, each read in a poll of its own, looked no more than a
    poll behind (only partitions read from counted): its last window was waited out."""
    w, topic = world
    w.write(topic, values(PARTITIONS * PER_PARTITION))
    source = w.open(topic, f"g-{uuid.uuid4().hex[:8]}")
    try:
        [first] = poll_until(source, 1, max_records=1)
        read = (first.topic, first.partition)
        lag = source.lag({read: first.offset})
        assert lag == {
            (topic, p): PER_PARTITION - 1 - first.offset if (topic, p) == read else PER_PARTITION
            for p in range(PARTITIONS)
        }
    finally:
        source.close(1.0)


def test_lag_leaves_out_a_partition_no_longer_assigned(world):
    """A worker cut off from its group loses its partitions while it still holds their
    records: asking their lag then must not raise (the Kafka client's did, and the worker
    exited), and their lag is their new owner's to report."""
    w, topic = world
    w.write(topic, values(PARTITIONS * PER_PARTITION))
    source = w.open(topic, f"g-{uuid.uuid4().hex[:8]}")
    try:
        got = poll_until(source, PARTITIONS * PER_PARTITION)
        consumed = {(r.topic, r.partition): r.offset for r in got}
        gone = (topic, PARTITIONS + 3)  # another's, or lost meanwhile
        lag = source.lag({**consumed, gone: 2})
        assert lag == {(topic, p): 0 for p in range(PARTITIONS)}
    finally:
        source.close(1.0)


def test_a_source_polled_the_moment_it_is_opened_reads_every_partition(world):
    """A Kafka consumer that joins its group before it knows the topic's partitions is
    assigned none until its next metadata refresh, minutes later: a worker that started fast
    read nothing. Each source here is polled the moment it is made."""
    w, topic = world
    w.write(topic, values(PARTITIONS * PER_PARTITION))
    for _ in range(6):
        source = w.open(topic, f"g-{uuid.uuid4().hex[:8]}")
        try:
            got = poll_until(source, PARTITIONS * PER_PARTITION, seconds=10)
            assert {r.partition for r in got} == set(range(PARTITIONS))
        finally:
            source.close(1.0)


def test_a_poll_takes_at_most_max_records_and_an_empty_one_waits_its_timeout(world):
    w, topic = world
    w.write(topic, values(8))
    source = w.open(topic, f"g-{uuid.uuid4().hex[:8]}")
    try:
        got = poll_until(source, 8, max_records=3)
        assert len(got) == 8
        started = time.monotonic()
        assert source.poll(0.3, 3) == []
        assert time.monotonic() - started >= 0.25
    finally:
        source.close(1.0)


def test_paused_polls_return_nothing_until_resumed(world):
    w, topic = world
    group = f"g-{uuid.uuid4().hex[:8]}"
    w.write(topic, values(4, "first"))
    source = w.open(topic, group)
    try:
        assert len(poll_until(source, 4)) == 4
        source.pause()
        w.write(topic, values(4, "second"))
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            assert source.poll(0.2, 500) == []
        source.resume()
        assert sorted(r.value for r in poll_until(source, 4)) == sorted(values(4, "second"))
    finally:
        source.close(1.0)


def test_a_member_of_the_group_starts_after_what_was_committed(world):
    w, topic = world
    group = f"g-{uuid.uuid4().hex[:8]}"
    w.write(topic, values(PARTITIONS * PER_PARTITION))
    source = w.open(topic, group)
    try:
        got = poll_until(source, PARTITIONS * PER_PARTITION)
        # Two records of each partition are done: the next member begins at the third.
        assert source.commit({(topic, p): 2 for p in range(PARTITIONS)}, timeout=5.0) is True
        source.finished({(topic, p): 2 for p in range(PARTITIONS)})  # never blocks
        assert source.take_revoked() == set()
        lag = source.lag({(r.topic, r.partition): r.offset for r in got})
        assert lag == {(topic, p): 0 for p in range(PARTITIONS)}
    finally:
        source.close(1.0)
        w.closed(source)
    again = w.open(topic, group)
    try:
        rest = poll_until(again, PARTITIONS * (PER_PARTITION - 2))
        assert sorted((r.partition, r.offset) for r in rest) == sorted(
            (p, o) for p in range(PARTITIONS) for o in range(2, PER_PARTITION)
        )
    finally:
        again.close(1.0)


def test_pausing_while_the_group_takes_a_partition_away_does_not_raise(kafka_bootstrap, make_topic):
    """The Kafka client runs a rebalance on its own thread: a partition in the assignment read a
    moment ago may be gone when it is paused or resumed."""
    topic = make_topic("contract", PARTITIONS)
    source = Kafka(kafka_bootstrap, make_topic).open(topic, f"g-{uuid.uuid4().hex[:8]}")
    try:
        deadline = time.monotonic() + 30
        while not source.assignment() and time.monotonic() < deadline:
            source.poll(0.2, 500)
        real = source._consumer.assignment
        source._consumer.assignment = lambda: {*real(), KafkaTP(topic, PARTITIONS + 3)}
        source.pause()
        Kafka(kafka_bootstrap, make_topic).write(topic, values(4))
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            assert source.poll(0.2, 500) == []  # the assigned partitions were paused all the same
        source.resume()
        source._consumer.assignment = real
        assert len(poll_until(source, 4)) == 4  # resumed: the assigned partitions read on
    finally:
        source.close(1.0)


@pytest.fixture
def backoffs_asked(monkeypatch) -> list[int]:
    """The metadata back-off in force each time a client judged whether to ask for metadata."""
    from kafka.cluster import ClusterMetadata

    seen: list[int] = []
    ttl = ClusterMetadata.ttl

    def spied(self):
        seen.append(self.config["retry_backoff_ms"])
        return ttl(self)

    monkeypatch.setattr(ClusterMetadata, "ttl", spied)
    return seen


def test_a_new_source_asks_for_its_topics_without_waiting_out_the_back_off(
    kafka_bootstrap, make_topic, backoffs_asked
):
    # kafka-python waits its 100 ms metadata back-off after the bootstrap before it asks for the
    # subscribed topics: the source shortens it while it waits for them, and only then.
    from worker.kafka import metadata

    topic = make_topic("prompt", PARTITIONS)
    source = Kafka(kafka_bootstrap, make_topic).open(topic, f"g-{uuid.uuid4().hex[:8]}")
    try:
        cluster = source._consumer._cluster
        assert cluster.partitions_for_topic(topic) == set(range(PARTITIONS))
        assert metadata.PROMPT_BACKOFF_MS in backoffs_asked  # the topics were asked for promptly
        assert cluster.config["retry_backoff_ms"] == 100  # and the back-off is kafka-python's again
    finally:
        source.close(1.0)


def test_a_new_client_asks_for_a_missing_topic_without_waiting_out_the_back_off(
    kafka_bootstrap, backoffs_asked
):
    # The receipts feed, the budget exchange and the dead-letter readers ask a new client for a
    # topic's partitions: a missing topic (a fresh receipts topic) cost the 100 ms back-off.
    from kafka import KafkaConsumer

    from worker.kafka import metadata

    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=None)
    try:
        assert metadata.partitions_of(consumer, f"missing-{uuid.uuid4().hex[:8]}") == set()
        assert metadata.PROMPT_BACKOFF_MS in backoffs_asked, backoffs_asked
        assert consumer._cluster.config["retry_backoff_ms"] == 100
    finally:
        consumer.close()


def test_a_source_joins_at_start_up_fetching_nothing_and_then_reads_everything(
    kafka_bootstrap, make_topic
):
    """``join`` (while the access check runs): the group is joined and the catch-up hook runs,
    nothing is fetched meanwhile, and the first poll after it reads every record once."""
    import threading

    topic = make_topic("join", PARTITIONS)
    kafka = Kafka(kafka_bootstrap, make_topic)
    kafka.write(topic, values(30))
    source = kafka.open(topic, f"g-{uuid.uuid4().hex[:8]}")
    caught_up = threading.Event()
    caught_up.set()
    hooked: list[bool] = []
    source.on_assign(lambda: hooked.append(True) or caught_up)
    fetched: list[int] = []
    poll = source._poll

    def spied(timeout, max_records=None):
        batches = poll(timeout, max_records)
        fetched.append(sum(len(r) for r in batches.values()))
        return batches

    source._poll = spied
    try:
        joined_at = time.monotonic() + 30
        polls_after_joined = []

        def done() -> bool:
            # Joined, then a few more polls: time enough for a fetch to have come back.
            if source.assignment():
                polls_after_joined.append(1)
            return len(polls_after_joined) > 20 or time.monotonic() > joined_at

        source.join(done, 30)
        assert source.assignment() == {(topic, p) for p in range(PARTITIONS)}
        assert hooked == [True]
        assert sum(fetched) == 0 and len(fetched) > 20
        assert source._consumer.paused() == set()
        got = poll_until(source, 30)
        assert sorted(r.value for r in got) == sorted(values(30))
        assert source.poll(0.3, 500) == []
    finally:
        source.close(1.0)


def test_a_join_ends_when_told_before_the_group_answers(kafka_bootstrap, make_topic):
    """The check said its word first: the join goes on in the loop's first poll, unpaused."""
    topic = make_topic("join", PARTITIONS)
    kafka = Kafka(kafka_bootstrap, make_topic)
    kafka.write(topic, values(9))
    source = kafka.open(topic, f"g-{uuid.uuid4().hex[:8]}")
    try:
        started = time.monotonic()
        source.join(lambda: True, 30)
        assert time.monotonic() - started < 0.5
        assert sorted(r.value for r in poll_until(source, 9)) == sorted(values(9))
    finally:
        source.close(1.0)
