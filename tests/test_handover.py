"""The rebalance listener's bookkeeping, without a broker (the Kafka tests run it for real)."""

from __future__ import annotations

import asyncio

from kafka import TopicPartition as KafkaTP

from worker.kafka.handover import Listener


class Consumer:
    """Records commits; the listener must not ask for one when the partitions are lost."""

    def __init__(self) -> None:
        self.commits: list[object] = []

    async def commit_async(self, offsets: object) -> None:
        self.commits.append(offsets)


def listener() -> tuple[Listener, Consumer, list[int]]:
    settled: list[int] = []
    out = Listener()
    consumer = Consumer()
    out.consumer = consumer  # type: ignore[assignment]
    out.settle = lambda: bool(settled.append(1))  # never done: a revocation would wait 2 s
    out.finished = {("t", 0): 41, ("t", 1): 7}
    return out, consumer, settled


def test_partitions_lost_are_forgotten_at_once_without_a_commit():
    """Evicted, the member's partitions are another's already: nothing to wait for, and a
    commit would fail (kafka-python's default ran the revocation: 2 s, then a failed commit)."""
    lost, consumer, settled = listener()
    asyncio.run(lost.on_partitions_lost([KafkaTP("t", 0)]))
    assert lost.revoked == {("t", 0)}
    assert settled == [] and consumer.commits == []
    asyncio.run(lost.on_partitions_assigned([KafkaTP("t", 1)]))
    assert lost.lost == {("t", 0)}
    assert lost.finished == {("t", 1): 7}


def test_partitions_revoked_are_settled_and_their_finished_records_committed():
    revoked, consumer, settled = listener()
    revoked.settle = lambda: bool(settled.append(1)) or True  # nothing in flight
    asyncio.run(revoked.on_partitions_revoked([KafkaTP("t", 0)]))
    assert revoked.revoked == {("t", 0)}
    assert settled == [1]
    assert len(consumer.commits) == 1
