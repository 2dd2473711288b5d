"""Kafka records into events: CloudEvents 1.0 (structured and binary) or plain JSON.

Decoding never raises anything but ``InvalidEvent``: a record that cannot be read is one the
worker dead-letters and moves past, never one it stops on.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any

import msgspec

from worker.config.model import EVENT_TYPE_FIELD, MAX_RECORD_BYTES
from worker.errors import InvalidEvent
from worker.events import Event, Record

CE_CONTENT_TYPE = "application/cloudevents+json"
CE_REQUIRED = ("id", "source", "specversion", "type")

_json_decode = msgspec.json.Decoder().decode


def decode(
    record: Record, *, max_bytes: int = MAX_RECORD_BYTES, type_field: str = EVENT_TYPE_FIELD
) -> Event:
    """Raises ``InvalidEvent`` with the decoder's reason; never anything else."""
    value = record.value
    if value is None:
        raise InvalidEvent("record has no value (a tombstone)")
    if len(value) > max_bytes:
        raise InvalidEvent(f"record value is {len(value)} bytes, over the limit of {max_bytes}")
    headers = _headers(record.headers) if record.headers else {}
    try:
        parsed = _json_decode(value)  # a quarter of the standard parser's time
    except (msgspec.DecodeError, ValueError, RecursionError):
        # The standard parser decides (it reads what this one refuses: NaN, infinities, lone
        # surrogates) and words the reason (bad UTF-8, bad JSON, too deep).
        parsed = _parse(value)
    key = _text(record.key)
    fallback_time = record_time(record)
    if "ce_specversion" in headers:
        body = {k[3:]: v for k, v in headers.items() if k.startswith("ce_")}
        body["data"] = parsed
        fmt = "cloudevents-binary"
    elif isinstance(parsed, dict) and (
        "specversion" in parsed or headers.get("content-type", "").startswith(CE_CONTENT_TYPE)
    ):
        body = parsed
        fmt = "cloudevents"
    else:
        if not isinstance(parsed, dict):
            raise InvalidEvent(f"event must be a JSON object, got {type(parsed).__name__}")
        body = parsed
        fmt = "json"
    get = body.get
    eid = get("id")
    if fmt != "json":
        etype = get("type")
        # Written out for the common case, every attribute there (once per record read).
        if not (
            type(eid) is str
            and type(etype) is str
            and type(source := get("source")) is str
            and eid
            and etype
            and source
            and get("specversion") == "1.0"
        ):
            _check_cloudevent(body)
    else:
        etype = get(type_field)
    if type(eid) is not str:
        eid = str(eid) if isinstance(eid, int) and not isinstance(eid, bool) else None
    where = record.origin or record
    # Positional: one is made for every record read.
    return Event(
        body,
        fmt,
        eid,
        etype if type(etype) is str else None,
        event_time(get("time")) or fallback_time,
        where.topic,
        where.partition,
        where.offset,
        key,
        headers,
        fallback_time,
    )


def _check_cloudevent(body: dict[str, Any]) -> None:
    """Raise ``InvalidEvent`` naming what a CloudEvent lacks or has wrong."""
    missing = [a for a in CE_REQUIRED if type(v := body.get(a)) is not str or not v]
    if missing:
        raise InvalidEvent(f"CloudEvent lacks required attribute(s): {', '.join(missing)}")
    if body["specversion"] != "1.0":
        raise InvalidEvent(f"CloudEvents specversion {body['specversion']!r} is not 1.0")


def _parse(value: bytes) -> Any:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent(f"record value is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidEvent(f"record value is not JSON: {exc}") from None
    except RecursionError:
        raise InvalidEvent("record value is JSON nested too deeply") from None


def _headers(raw: tuple[tuple[str, bytes], ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in raw:
        out[name.lower()] = value.decode("utf-8", "replace") if value is not None else ""
    return out


def _text(raw: bytes | None) -> str | None:
    return raw.decode("utf-8", "replace") if raw is not None else None


def record_time(record: Record) -> float | None:
    """The Kafka record's timestamp, in seconds (None when it has none)."""
    return record.timestamp_ms / 1000 if record.timestamp_ms else None


def event_time(value: Any) -> float | None:
    """The event's own time; None when it has none. A time that is not one is the event's
    error: the ledger would otherwise judge it by no time at all, silently."""
    if value is None:
        return None
    if type(value) is str:
        try:
            when = datetime.fromisoformat(value).timestamp()  # "Z" included, since 3.11
        except (ValueError, OverflowError, OSError):
            when = math.nan
    elif isinstance(value, int | float) and not isinstance(value, bool):
        # Epoch seconds or milliseconds: anything past year 33658 in seconds is milliseconds.
        when = value / 1000 if value > 1e12 else float(value)
    else:
        when = math.nan
    if not math.isfinite(when):
        shown = repr(value) if not isinstance(value, str) else repr(value[:40])
        raise InvalidEvent(
            f"event time {shown} is not a time: use RFC 3339 (2026-01-02T03:04:05Z) "
            "or epoch seconds or milliseconds"
        )
    return when
