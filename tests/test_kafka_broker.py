"""Proves the test broker is a real Kafka: headers survive a round trip, and a committed offset
is seen by a second consumer of the same group."""

from __future__ import annotations

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

pytestmark = pytest.mark.kafka


def test_round_trip_with_headers_and_committed_offset(kafka_bootstrap, make_topic, unique):
    topic = make_topic("roundtrip")
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for i in range(5):
        producer.send(
            topic,
            key=f"k{i}".encode(),
            value=f"v{i}".encode(),
            headers=[("ce_id", f"{i}".encode())],
        ).get(timeout=30)
    producer.close()

    group = f"g-{unique}"
    tp = TopicPartition(topic, 0)
    first = KafkaConsumer(
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    first.assign([tp])
    seen = []
    while len(seen) < 3:
        for records in first.poll(timeout_ms=1000).values():
            seen.extend(records)
    seen = seen[:3]
    assert [r.value for r in seen] == [b"v0", b"v1", b"v2"]
    assert seen[1].headers == [("ce_id", b"1")]
    first.commit({tp: OffsetAndMetadata(3, "", -1)})
    first.close()

    second = KafkaConsumer(
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    second.assign([tp])
    assert second.committed(tp) == 3
    rest = []
    while len(rest) < 2:
        for records in second.poll(timeout_ms=1000).values():
            rest.extend(records)
    assert [r.value for r in rest] == [b"v3", b"v4"]
    second.close()
