"""Receipts of what the outcome stage saw end: each accepted purge request with the events it
was for, and each record dead-lettered with its reason (the format is ``worker.receipts``).

Written without waiting: the sink (``worker.kafka.receipts.KafkaReceiptSink``) queues and never
fails, so receipts neither hold back a commit nor fail a record.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain
from typing import Protocol

from worker.errors import PermanentError
from worker.events import Record
from worker.observe.logs import redact_text
from worker.outcome.dead_letters import MAX_MESSAGE
from worker.outcome.inflight import InFlight, InFlightRecords
from worker.receipts import (
    MAX_RECORDS_BYTES,
    EventRef,
    Purge,
    Records,
    dead_letter_receipt,
    purge_receipt,
)
from worker.sending.stage import Purged


class ReceiptSink(Protocol):
    member: str  # which worker writes (a CloudEvents extension attribute); "" for none

    def submit(self, key: bytes, value: bytes) -> None:
        """Queue one receipt; never blocks, never raises."""

    def written(self) -> bool:
        """Every receipt submitted so far was written, or given up (never blocks)."""

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
        """One receipt per accepted request (more if it carried more records than one receipt
        holds, ``MAX_RECORDS_BYTES``); the events are those of its items' owners still in
        flight (an owner revoked meanwhile is someone else's to report)."""
        for p in purged:
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
            named, written = Records(), False
            # Each owner once, in the order met (a record may own several of the items).
            owners = dict.fromkeys(chain.from_iterable(item.owners for item in p.items))
            for state in records.states(owners):
                r = _origin(state)
                named.add(state.event_id, r.topic, r.partition, r.offset)
                if named.size >= MAX_RECORDS_BYTES:
                    self.sink.submit(*purge_receipt(receipt, self.source, self.member, named))
                    named, written = Records(), True
            if named.size or not written:  # every purge is told, even for no record still here
                self.sink.submit(*purge_receipt(receipt, self.source, self.member, named))

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

    def written(self) -> bool:
        return self.sink.written()

    def close(self, timeout: float) -> None:
        self.sink.close(timeout)


def _origin(state: InFlight) -> Record:
    """The record a receipt names: a replayed dead letter's is the one it first came from."""
    return state.record.origin or state.record


def _event(state: InFlight) -> EventRef:
    r = _origin(state)
    return EventRef(state.event_id, r.topic, r.partition, r.offset)
