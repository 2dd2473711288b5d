"""Where records come from, as the loop sees it: the ``Source`` interface.

Its implementations: ``worker.kafka.consumer.KafkaSource`` (production), ``worker.kafka.reader
.DeadLetterReader`` (replay) and ``worker.intake.memory.InMemorySource`` (tests); one contract
suite runs against the first and the last.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from worker.events import Record, TopicPartition


class Source(Protocol):
    def poll(self, timeout: float, max_records: int) -> list[Record]:
        """Records in offset order per partition; blocks up to ``timeout`` seconds."""

    def commit(self, offsets: dict[TopicPartition, int], timeout: float) -> bool:
        """Commit ``offsets`` (the next offset to read), waiting at most ``timeout`` seconds;
        False if it failed or was not confirmed in time (the group moved on, Kafka is down)."""

    def pause(self) -> None:
        """Stop fetching from every assigned partition; ``poll`` keeps the membership alive."""

    def resume(self) -> None: ...

    def finished(self, offsets: dict[TopicPartition, int]) -> None:
        """Offsets that may be committed now (every record below them is finished): a
        rebalance commits these before the partitions change hands. Must not block."""

    def take_revoked(self) -> set[TopicPartition]:
        """Partitions lost to another member since the last call (revoked and not assigned
        back). Must not block."""

    def assignment(self) -> set[TopicPartition]: ...

    def rebalance_pending(self) -> bool:
        """The group is rebalancing and this member still holds partitions: they may be given
        up at any moment. Must not block."""

    def on_revoke(self, settle: Callable[[], bool]) -> None:
        """What a revocation calls, again and again for a short while, before it commits the
        finished records and lets the partitions go: ``settle`` collects ended requests and
        finishes their records (updating ``finished``), and says whether nothing is in flight
        any more. It is called from the Kafka client's thread while the loop waits
        inside ``poll``; it must not block."""

    def last_contact(self) -> float | None:
        """Monotonic time Kafka was last heard from (None: not known yet)."""

    def total_partitions(self) -> int:
        """Partitions of every subscribed topic (for this replica's share of the budget)."""

    def lag(self, consumed: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        """Records behind the log end per partition, given the last consumed offsets; an
        assigned partition not consumed from yet counts from where its reading starts (once
        its end is known). A partition consumed from but no longer assigned (the group moved
        it, perhaps while this was asked) is left out. Never raises for such a partition."""

    def close(self, timeout: float = 10.0) -> None: ...
