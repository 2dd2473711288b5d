"""Receipts on the mock clock: what a receipt says, that it reads back as written, and that a
ledger seeded from receipts finishes exactly what its own rule allows, never more. The Kafka
topic itself (writing, restoring after SIGKILL, a handover, a topic that is missing or refused)
is proven in ``test_receipts_kafka.py``."""

import json

from tests import test_pipeline_unit as unit
from tests.conftest import ZONE_A, ZONE_B
from tests.helpers import cloudevent
from worker.clock import MockClock
from worker.events import Record
from worker.outcome.memory import InMemoryReceipts
from worker.pending.ledger import key_of
from worker.receipts import (
    DEAD_LETTERED,
    MAX_RECORDS_BYTES,
    PURGED,
    EventRef,
    Purge,
    events_of,
    ledger_entries,
    purge_of,
    purge_receipt,
    read,
)
from worker.targets import Kind, Mode, Target


def build(records, clock, receipts=None, learned=None):
    loop, source, _, api = unit.build(
        records, plan="enterprise", clock=clock, receipts=receipts, learned=learned
    )
    return loop, source, api


def image(offset, path, event_id, at_ms):
    value = cloudevent("image.updated", {"host": "img.example-cdn.net", "path": path}, event_id)
    return Record("cms", 0, offset, b"k", value, (), at_ms)


def test_a_receipt_reads_back_as_the_purge_it_tells_of_with_the_ledgers_keys():
    targets = {
        Kind.FILES: (
            Target.url("https://www.example.com/a"),
            Target.url("https://m.example.com/a", {"CF-Device-Type": "mobile"}),
        ),
        Kind.TAGS: (Target.tag("article-1", "example.com"),),
        Kind.HOSTS: (Target.host("img.example-cdn.net"),),
        Kind.PREFIXES: (Target.prefix("www.example.com/news/"),),
        Kind.EVERYTHING: (Target.everything("example.com"),),
    }
    for kind, ts in targets.items():
        purge = Purge(
            zone="example.com",
            zone_id=ZONE_A,
            mode=Mode.INVALIDATE if kind is Kind.TAGS else Mode.PURGE,
            kind=kind,
            targets=ts,
            sent_at=1_800_000_000.125,
            accepted_at=1_800_000_000.5,
            request_ids=("req-1",),
            events=(EventRef("e1", "cms", 3, 17), EventRef(None, "cms", 0, 2)),
        )
        key, value = purge_receipt(purge, "purge-worker/g")
        assert key == ZONE_A.encode()
        receipt = read(value)
        assert receipt is not None
        assert receipt["specversion"] == "1.0" and receipt["type"] == PURGED
        assert receipt["source"] == "purge-worker/g" and receipt["subject"] == "example.com"
        assert receipt["time"] == "2027-01-15T08:00:00.500Z"
        back = purge_of(receipt)
        assert back is not None
        assert back.targets == ts and back.events == purge.events
        assert back.sent_at == purge.sent_at and back.request_ids == ("req-1",)
        assert ledger_entries([back]) == [
            (key_of(ZONE_A, purge.mode, t), purge.sent_at) for t in ts
        ]


def test_what_is_not_a_receipt_of_ours_is_skipped_whole():
    good = json.loads(
        purge_receipt(
            Purge("z", ZONE_A, Mode.PURGE, Kind.TAGS, (Target.tag("t"),), 1.0, 2.0, (), ()),
            "s",
        )[1]
    )
    assert purge_of(good) is not None
    for value in (b"", b"{", b"[]", b'{"type": "other", "data": {}}', b'{"type": 1}'):
        assert read(value) is None, value
    broken = [
        {**good, "data": {**good["data"], "kind": "files?"}},
        {**good, "data": {**good["data"], "sent_at_unix": "soon"}},
        {**good, "data": {**good["data"], "items": [{"url": 1}]}},
        {**good, "data": {**good["data"], "items": None}},
        {**good, "data": {**good["data"], "accepted_at": "yesterday"}},
        {**good, "data": {**good["data"], "events": [{"id": "e"}]}},
        {**good, "data": {**good["data"], "events": [{"topic": "t", "partition": 0}]}},
        {**good, "data": {**good["data"], "events": [_group(offsets=[1, 2], ids=["a"])]}},
        {**good, "data": {**good["data"], "events": [_group(offsets=["x"], ids=["a"])]}},
        {**good, "data": {**good["data"], "events": [_group(offsets=None, ids=None)]}},
    ]
    for receipt in broken:
        assert read(json.dumps(receipt).encode()) is not None
        assert purge_of(receipt) is None, receipt


def _group(**fields):
    return {"topic": "t", "partition": 0, **fields}


def test_receipts_name_each_purge_with_its_events_and_each_dead_letter_with_its_reason():
    clock = MockClock()
    old = int((clock.time() - 60) * 1000)
    records = [
        image(0, "a.jpg", "e0", old),
        image(1, "a.jpg", "e1", old),  # the same URL: one purge, both events
        image(2, "b.jpg", "e2", old),
        Record("cms", 0, 3, b"k", b"{not json", (), old),
    ]
    sink = InMemoryReceipts()
    loop, source, api = build(records, clock, receipts=sink)
    unit.run_until_idle(loop, source)
    receipts = [read(v) for _, v in sink.receipts]
    purged = [r for r in receipts if r and r["type"] == PURGED]
    dead = [r for r in receipts if r and r["type"] == DEAD_LETTERED]
    assert len(purged) == len(api.purges()) == 1
    data = purged[0]["data"]
    assert data["zone"] == "cdn" and data["zone_id"] == ZONE_B and data["kind"] == "files"
    assert sorted(data["items"]) == [
        "https://img.example-cdn.net/a.jpg",
        "https://img.example-cdn.net/b.jpg",
    ]
    # One group per partition, its offsets and ids side by side.
    assert [(g["topic"], g["partition"], len(g["offsets"])) for g in data["events"]] == [
        ("cms", 0, 3)
    ]
    assert sorted((e["id"], e["offset"]) for e in events_of(purged[0])) == [
        ("e0", 0),
        ("e1", 1),
        ("e2", 2),
    ]
    assert data["request_ids"], data
    assert len(dead) == 1
    assert dead[0]["data"]["event"] == {"id": None, "topic": "cms", "partition": 0, "offset": 3}
    assert dead[0]["data"]["error_class"] == "invalid_event"
    assert "not JSON" in dead[0]["data"]["reason"]
    assert dead[0]["data"]["dead_letter_topic"] == "dlq"


def test_a_request_for_more_records_than_a_receipt_holds_gets_several_receipts():
    """A backlog's request may carry a whole topic's worth of records: each receipt stays well
    under what Kafka takes (1 MB) and every record is named exactly once."""
    clock = MockClock()
    old = int((clock.time() - 60) * 1000)
    n = 15_000  # within one backlog's worth of records in flight
    long_id = "x" * 30
    records = [image(i, "same.jpg", f"{long_id}{i}", old) for i in range(n)]
    sink = InMemoryReceipts()
    loop, source, api = build(records, clock, receipts=sink)
    unit.run_until_idle(loop, source)
    assert len(api.purges()) == 1
    values = [v for _, v in sink.receipts]
    assert len(values) >= 2
    assert max(len(v) for v in values) < MAX_RECORDS_BYTES + 64 * 1024
    named = [e["offset"] for v in values for e in events_of(read(v))]
    assert sorted(named) == list(range(n))
    assert all(read(v)["data"]["items"] == ["https://img.example-cdn.net/same.jpg"] for v in values)


def test_a_ledger_seeded_from_receipts_finishes_what_they_cover_and_sends_the_rest():
    clock = MockClock()
    old = int((clock.time() - 60) * 1000)
    first = [image(i, f"p{i}.jpg", f"e{i}", old) for i in range(40)]
    sink = InMemoryReceipts()
    loop, source, api = build(first, clock, receipts=sink)
    unit.run_until_idle(loop, source)
    assert len(api.items("files")) == 40

    # A new worker (a restart, or the partitions' next owner) gets the same records again, plus
    # two changes made after those purges went: it learns the receipts before planning.
    clock.advance(30)
    later = int((clock.time() - 1) * 1000)
    again = [
        *first,
        image(40, "p3.jpg", "e40", later),  # changed again since its purge: must go
        image(41, "new.jpg", "e41", later),
    ]
    entries = ledger_entries(p for _, v in sink.receipts if (r := read(v)) and (p := purge_of(r)))
    handed = [entries]
    loop2, source2, api2 = build(again, clock, learned=lambda: handed.pop() if handed else [])
    unit.run_until_idle(loop2, source2)
    assert sorted(api2.items("files")) == [
        "https://img.example-cdn.net/new.jpg",
        "https://img.example-cdn.net/p3.jpg",
    ]
    assert source2.committed[("cms", 0)] == 42
