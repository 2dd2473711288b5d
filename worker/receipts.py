"""Purge receipts: what the worker purged and dead-lettered, as CloudEvents on a Kafka topic.

A receipt is written for every purge request the API accepted (type ``PURGED``), for every
record dead-lettered (type ``DEAD_LETTERED``), and for every URL warmed after its purge (type
``WARMED``: what ``CF-Cache-Status`` said, the proof that the purge took effect). Receipts are the
worker's memory across crashes and handovers (the purge ledger is seeded from them), the answer to
"was this page purged, when, and for which event?" (``purge-worker trace``), and what a CMS
consumes to learn that its change is live.

This module is the format, written once: how a receipt is made and how one is read back. The value
is a structured-mode CloudEvent (JSON, ``specversion`` 1.0); the record's key is the zone id (the
record id for a dead letter), so one zone's receipts keep their order.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from worker.clock import parse_rfc3339, rfc3339
from worker.targets import Kind, Mode, Target

PURGED = "purge-worker.purge.completed"
DEAD_LETTERED = "purge-worker.record.dead_lettered"
WARMED = "purge-worker.url.warmed"
TYPES = (PURGED, DEAD_LETTERED, WARMED)

# (zone id, mode, kind, value, cache-key headers): the purge ledger's key for one item.
LedgerKey = tuple[str, Mode, Kind, str, tuple[tuple[str, str], ...]]


def source_of(group: str) -> str:
    """The CloudEvents ``source`` of a group's receipts."""
    return f"purge-worker/{group}"


_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class EventRef:
    """An event a receipt is for: its id (if it had one) and where its record was."""

    id: str | None
    topic: str
    partition: int
    offset: int

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
        }


@dataclass(frozen=True, slots=True)
class Purge:
    """One accepted purge request, as a receipt tells it."""

    zone: str
    zone_id: str
    mode: Mode
    kind: Kind
    targets: tuple[Target, ...]
    sent_at: float  # wall-clock time just before the request went: what the ledger goes by
    accepted_at: float
    request_ids: tuple[str, ...]
    events: tuple[EventRef, ...]
    receipt_id: str = ""
    source: str = ""


# How many bytes of records one receipt names at most (more: several receipts, each with its
# items). Kafka refuses a record over 1 MB by default; a request's items take up to ~100 KB.
MAX_RECORDS_BYTES = 512 * 1024


class Records:
    """The records a purge receipt names, by topic and partition: offsets and event ids side by
    side (a backlog's request carries thousands; one object each made them five times larger)."""

    __slots__ = ("_groups", "size")

    def __init__(self) -> None:
        self._groups: dict[tuple[str, int], tuple[list[int], list[str | None]]] = {}
        self.size = 0  # about how many bytes they take in the receipt

    def add(self, event_id: str | None, topic: str, partition: int, offset: int) -> None:
        group = self._groups.get((topic, partition))
        if group is None:
            group = self._groups[topic, partition] = ([], [])
        group[0].append(offset)
        group[1].append(event_id)
        self.size += 16 + (len(event_id) if event_id else 0)

    def as_json(self) -> list[dict[str, Any]]:
        return [
            {"topic": topic, "partition": partition, "offsets": offsets, "ids": ids}
            for (topic, partition), (offsets, ids) in self._groups.items()
        ]

    @classmethod
    def of(cls, events: Iterable[EventRef]) -> Records:
        records = cls()
        for e in events:
            records.add(e.id, e.topic, e.partition, e.offset)
        return records


def purge_receipt(
    purge: Purge, source: str, member: str = "", records: Records | None = None
) -> tuple[bytes, bytes]:
    """The key and value of ``purge``'s receipt; ``member``: the worker that writes it;
    ``records``: ``purge.events`` already grouped (the worker groups them as it goes)."""
    data = {
        "zone": purge.zone,
        "zone_id": purge.zone_id,
        "mode": purge.mode.value,
        "kind": purge.kind.value,
        "items": [t.item() for t in purge.targets],
        "sent_at": rfc3339(purge.sent_at),
        "sent_at_unix": round(purge.sent_at, 6),
        "accepted_at": rfc3339(purge.accepted_at),
        "request_ids": list(purge.request_ids),
        "events": (records if records is not None else Records.of(purge.events)).as_json(),
    }
    value = _event(PURGED, source, member, purge.accepted_at, purge.zone, data)
    return purge.zone_id.encode(), value


def dead_letter_receipt(
    event: EventRef,
    error_class: str,
    reason: str,
    *,
    topic: str,
    at: float,
    source: str,
    member: str = "",
) -> tuple[bytes, bytes]:
    """The key and value of a dead-lettered record's receipt (``reason`` already redacted)."""
    data = {"event": event.as_json(), "error_class": error_class, "reason": reason}
    data["dead_letter_topic"] = topic
    key = f"{event.topic}/{event.partition}/{event.offset}".encode()
    return key, _event(DEAD_LETTERED, source, member, at, event.id or "", data)


def warm_receipt(
    zone: str,
    url: str,
    headers: tuple[tuple[str, str], ...],
    status: int | None,
    cache_status: str,
    *,
    at: float,
    source: str,
    member: str = "",
) -> tuple[bytes, bytes]:
    """The key and value of a warm request's receipt."""
    data: dict[str, Any] = {"zone": zone, "url": url, "status": status}
    if headers:
        data["headers"] = dict(headers)
    data["cache_status"] = cache_status
    return url.encode(), _event(WARMED, source, member, at, zone, data)


def _event(  # noqa: PLR0917 (private, and every argument is one attribute of the event)
    kind: str, source: str, member: str, at: float, subject: str, data: dict[str, Any]
) -> bytes:
    event = {
        "specversion": "1.0",
        "id": uuid.uuid4().hex,
        "source": source,
        "type": kind,
        "time": rfc3339(at),
        "subject": subject,
        "datacontenttype": "application/json",
    }
    if member:
        # An extension attribute: which worker wrote it (its own receipts it need not learn).
        event["member"] = member
    return _encode({**event, "data": data})


def member_marker(member: str) -> bytes:
    """How ``member``'s receipts spell it, to skip them before decoding."""
    return b'"member":' + _encode(member)


def read(value: bytes | None) -> dict[str, Any] | None:
    """A receipt's CloudEvent, or None for anything that is not one of ours."""
    if not value:
        return None
    try:
        raw = _decode(value)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    if not isinstance(raw, dict) or raw.get("type") not in TYPES:
        return None
    if not isinstance(raw.get("data"), dict):
        return None
    return raw


def purge_of(receipt: dict[str, Any]) -> Purge | None:
    """The purge a ``PURGED`` receipt tells of; None if it is another type or malformed (a
    receipt written by hand, or by a later version, is skipped, never trusted halfway)."""
    if receipt.get("type") != PURGED:
        return None
    d = receipt["data"]
    try:
        kind, mode = Kind(d["kind"]), Mode(d["mode"])
        sent_at = float(d["sent_at_unix"])
        targets = tuple(_target(kind, item, str(d["zone"])) for item in d["items"])
        events = tuple(
            EventRef(
                None if e["id"] is None else str(e["id"]), e["topic"], e["partition"], e["offset"]
            )
            for e in _expanded(d.get("events", ()))
        )
        accepted_at = parse_rfc3339(str(d["accepted_at"]))
        if accepted_at is None:
            return None
        return Purge(
            zone=str(d["zone"]),
            zone_id=str(d["zone_id"]),
            mode=mode,
            kind=kind,
            targets=targets,
            sent_at=sent_at,
            accepted_at=accepted_at,
            request_ids=tuple(str(r) for r in d.get("request_ids", ())),
            events=events,
            receipt_id=str(receipt.get("id", "")),
            source=str(receipt.get("source", "")),
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _target(kind: Kind, item: Any, zone: str) -> Target:
    """A target exactly as it was sent (values in a receipt are already normalised)."""
    if kind is Kind.FILES and isinstance(item, dict):
        headers = item["headers"]
        if not isinstance(headers, dict):
            raise TypeError("headers")
        pairs = tuple((str(k), str(v)) for k, v in headers.items())
        return Target(kind, str(item["url"]), pairs)
    if not isinstance(item, str):
        raise TypeError("item")
    if kind is Kind.TAGS:
        return Target(kind, item, zone=zone)
    if kind is Kind.EVERYTHING:
        return Target(kind, item, zone=item)
    return Target(kind, item)


def ledger_entries(purges: Iterable[Purge]) -> list[tuple[LedgerKey, float]]:
    """What the purge ledger learns from receipts: each item, purged as of its send time."""
    out: list[tuple[LedgerKey, float]] = []
    for p in purges:
        for t in p.targets:
            value = "" if t.kind is Kind.EVERYTHING else t.value
            out.append(((p.zone_id, p.mode, t.kind, value, t.headers), p.sent_at))
    return out


def events_of(receipt: dict[str, Any]) -> Sequence[dict[str, Any]]:
    """The events a receipt names (one for a dead letter)."""
    d = receipt["data"]
    if receipt["type"] == DEAD_LETTERED:
        event = d.get("event")
        return [event] if isinstance(event, dict) else []
    try:
        return _expanded(d.get("events", ()))
    except (KeyError, TypeError, ValueError):
        return []


def _expanded(groups: Any) -> list[dict[str, Any]]:
    """A purge receipt's ``events`` (groups of offsets and ids per partition), one dict per
    event. Raises ``TypeError`` or ``ValueError`` on anything else."""
    out: list[dict[str, Any]] = []
    for g in groups:
        topic, partition = str(g["topic"]), int(g["partition"])
        offsets, ids = g["offsets"], g["ids"]
        if not isinstance(offsets, list) or not isinstance(ids, list) or len(offsets) != len(ids):
            raise ValueError("events")
        out += [
            {"id": i, "topic": topic, "partition": partition, "offset": int(o)}
            for o, i in zip(offsets, ids, strict=True)
        ]
    return out
