"""Receipts of what the outcome stage saw end: each accepted purge request with the events it
was for, and each record dead-lettered with its reason (the format is ``worker.receipts``).

Written without waiting: the sink (``worker.kafka.receipts.KafkaReceiptSink``) queues and never
fails, so receipts neither hold back a commit nor fail a record.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from worker.errors import PermanentError
from worker.observe.logs import redact_text
from worker.outcome.dead_letters import MAX_MESSAGE
from worker.outcome.inflight import InFlight, InFlightRecords
from worker.receipts import EventRef, Purge, dead_letter_receipt, purge_receipt
from worker.sending.stage import Purged


class ReceiptSink(Protocol):
    member: str  # which worker writes (a CloudEvents extension attribute); "" for none

    def submit(self, key: bytes, value: bytes) -> None:
        """Queue one receipt; never blocks, never raises."""

    def close(self, timeout: float = 1.0) -> None: ...


class Receipts:
    """Makes receipts and hands them to ``sink``. ``source`` is the CloudEvents ``source`` (the
    worker's group), ``dead_letter_topic`` where dead letters go, ``member`` this worker."""

    def __init__(
        self, sink: ReceiptSink, source: str, dead_letter_topic: str, member: str = ""
    ) -> None:
        self.sink = sink
        self.source = source
        self.dead_letter_topic = dead_letter_topic
        self.member = member

    def purged(self, purged: Iterable[Purged], records: InFlightRecords) -> None:
        """One receipt per accepted request; the events are those of its items' owners still in
        flight (an owner revoked meanwhile is someone else's to report). A backlog's request
        carries thousands of records: each is encoded once, however many requests carry it."""
        for p in purged:
            events: dict[object, bytes] = {}
            for item in p.items:
                for owner in item.owners:
                    if owner in events:
                        continue
                    state = records.get(owner)
                    if state is None:
                        continue
                    if state.receipt is None:
                        state.receipt = _event(state).encoded()
                    events[owner] = state.receipt
            receipt = Purge(
                zone=p.zone,
                zone_id=p.zone_id,
                mode=p.mode,
                kind=p.kind,
                targets=tuple(item.target for item in p.items),
                sent_at=p.sent_at,
                accepted_at=p.accepted_at,
                request_ids=p.request_ids,
                events=(),
            )
            self.sink.submit(
                *purge_receipt(receipt, self.source, self.member, list(events.values()))
            )

    def dead_lettered(self, state: InFlight, error: PermanentError, at: float) -> None:
        reason = redact_text(str(error))[:MAX_MESSAGE]
        key, value = dead_letter_receipt(
            _event(state),
            error.error_class,
            reason,
            topic=self.dead_letter_topic,
            at=at,
            source=self.source,
            member=self.member,
        )
        self.sink.submit(key, value)

    def close(self, timeout: float) -> None:
        self.sink.close(timeout)


def _event(state: InFlight) -> EventRef:
    # A replayed dead letter names the record it first came from.
    r = state.record.origin or state.record
    return EventRef(state.event_id, r.topic, r.partition, r.offset)
