"""The worker's consumer reads fetched batches straight into ``Record``s (``worker.kafka.records``).
Each case reads the same bytes twice, through kafka-python's own ``PartitionRecords`` (then
``to_record``, as the worker did) and through ``BatchRecords``, and asks for the same records,
the same fetch position after every take and the same errors; the last case reads from a real
broker through ``KafkaSource``."""

from __future__ import annotations

import gzip
import struct
import time
import uuid
import zlib
from types import SimpleNamespace

import pytest
from kafka import KafkaProducer
from kafka import TopicPartition as KafkaTP
from kafka.consumer.fetcher import Fetcher, IsolationLevel
from kafka.errors import CorruptRecordError
from kafka.record.default_records import DefaultRecordBase, DefaultRecordBatchBuilder
from kafka.record.legacy_records import LegacyRecordBatchBuilder
from kafka.record.memory_records import MemoryRecords
from kafka.record.util import calc_crc32c

from worker.config.load import parse
from worker.events import Record
from worker.kafka.client import to_record
from worker.kafka.consumer import KafkaSource
from worker.kafka.records import BatchRecords, read_as_records

TP = KafkaTP("cms", 3)
NOW_MS = 1_780_000_000_000


def v2(
    records: list[tuple[int, int, bytes | None, bytes | None, list]],
    *,
    codec: int = 0,
    producer_id: int = -1,
    transactional: bool = False,
    set_bits: int = 0,
) -> bytes:
    """A format-v2 batch of (offset, timestamp, key, value, headers); ``set_bits`` ORed into
    its attributes (log-append time, control), its CRC made again."""
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=codec,
        is_transactional=transactional,
        producer_id=producer_id,
        producer_epoch=0 if producer_id >= 0 else -1,
        base_sequence=0 if producer_id >= 0 else -1,
        batch_size=1 << 30,
    )
    for offset, ts, key, value, headers in records:
        builder.append(offset, timestamp=ts, key=key, value=value, headers=headers)
    data = bytearray(builder.build())
    if set_bits:
        at = DefaultRecordBase.ATTRIBUTES_OFFSET
        (attributes,) = struct.unpack_from(">h", data, at)
        struct.pack_into(">h", data, at, attributes | set_bits)
        crc = calc_crc32c(memoryview(data)[at:])
        struct.pack_into(">I", data, DefaultRecordBase.CRC_OFFSET, crc)
    return bytes(data)


def legacy(magic: int, values: list[bytes], base: int = 0) -> bytes:
    builder = LegacyRecordBatchBuilder(magic=magic, compression_type=0, batch_size=1 << 30)
    for i, value in enumerate(values):
        builder.append(base + i, timestamp=NOW_MS + i if magic else None, key=b"k", value=value)
    return bytes(builder.build())


def both(data: bytes, *, fetch_offset: int = 0, takes: tuple[int | None, ...] = (None,), **kw):
    """What each reading hands out, take by take, with the fetch position after each."""
    out = []
    for cls in (Fetcher.PartitionRecords, BatchRecords):
        part = cls(fetch_offset, TP, MemoryRecords(data), **kw)
        seen = []
        for n in takes:
            got = part.take(n)
            if cls is Fetcher.PartitionRecords:
                got = [to_record(r) for r in got]
            seen.append((got, part.next_fetch_offset))
        out.append(seen)
    return out


def plain(n: int, base: int = 0) -> list[tuple[int, int, bytes | None, bytes | None, list]]:
    return [(base + i, NOW_MS + 7 * i, None, f'{{"n": {i}}}'.encode() * 3, []) for i in range(n)]


def test_a_batch_reads_as_kafka_python_reads_it_every_field_and_position():
    records = [
        (0, NOW_MS, None, b"v" * 10, []),
        (1, NOW_MS + 900_000, b"key", b"x" * 70_000, [("ce_type", b"published")]),  # long
        (2, NOW_MS - 5, b"", b"", [("a", None), ("b", b"")]),  # negative delta, empties
        (3, NOW_MS + 1, None, None, [("\u00e9t\u00e9", b"\x00\xff")]),  # a tombstone
        (7, NOW_MS + 2, b"k" * 300, b"after a gap left by compaction", []),
    ]
    (ours, theirs) = both(v2(records), takes=(2, 1, None))
    assert ours == theirs
    got = [r for take, _ in theirs for r in take]
    assert [r.offset for r in got] == [0, 1, 2, 3, 7]
    assert got[2].headers == (("a", None), ("b", b""))
    assert got[3].value is None and got[4].key == b"k" * 300
    assert all(type(r) is Record and r.origin is None and r.attempts == 0 for r in got)
    assert [pos for _, pos in theirs] == [2, 3, 8]


def test_compressed_batches_and_log_append_time_read_alike():
    batches = v2(plain(40), codec=DefaultRecordBase.CODEC_GZIP) + v2(
        plain(5, base=40), set_bits=DefaultRecordBase.TIMESTAMP_TYPE_MASK
    )
    (ours, theirs) = both(batches, takes=(17, 30))
    assert ours == theirs
    late = theirs[1][0][-5:]
    assert {r.timestamp_ms for r in late} == {NOW_MS + 7 * 4}  # the batch's max timestamp


def test_a_fetch_from_the_middle_of_a_batch_hands_out_only_what_follows():
    (ours, theirs) = both(v2(plain(10)), fetch_offset=6)
    assert ours == theirs
    assert [r.offset for r in theirs[0][0]] == [6, 7, 8, 9]


def test_control_batches_and_aborted_transactions_are_passed_over():
    control = v2(
        [(5, NOW_MS, struct.pack(">hh", 0, 0), b"\x00\x00\x00\x00\x00\x00", [])],
        producer_id=9,
        transactional=True,
        set_bits=DefaultRecordBase.CONTROL_MASK,
    )
    aborted = v2(plain(3, base=2), producer_id=9, transactional=True)
    data = v2(plain(2)) + aborted + control + v2(plain(2, base=6))
    (ours, theirs) = both(data)
    assert ours == theirs
    assert [r.offset for r in theirs[0][0]] == [0, 1, 2, 3, 4, 6, 7]  # read uncommitted
    committed = {
        "isolation_level": IsolationLevel.READ_COMMITTED,
        "aborted_transactions": [SimpleNamespace(producer_id=9, first_offset=2)],
    }
    (ours, theirs) = both(data, **committed)
    assert ours == theirs
    assert [r.offset for r in theirs[0][0]] == [0, 1, 6, 7]
    assert theirs[0][1] == 8


def test_older_formats_are_read_record_by_record():
    data = legacy(0, [b"a", b"b"]) + legacy(1, [b"c", b"d"], base=2)
    (ours, theirs) = both(data, takes=(3, None))
    assert ours == theirs
    assert [r.value for take, _ in theirs for r in take] == [b"a", b"b", b"c", b"d"]


def corrupt(data: bytes, *, longer: bool = False, more: bool = False) -> bytes:
    """``data`` (one batch) with its first record said one byte longer than it is, or with one
    record more said to follow than it holds; its CRC made again, so that only the reading of
    its records can tell."""
    out = bytearray(data)
    header = DefaultRecordBase.HEADER_STRUCT.size
    if longer:
        out[header] += 2  # zigzag: +2 is one more byte
    if more:
        (count,) = struct.unpack_from(">i", out, header - 4)
        struct.pack_into(">i", out, header - 4, count + 1)
    at = DefaultRecordBase.ATTRIBUTES_OFFSET
    struct.pack_into(">I", out, DefaultRecordBase.CRC_OFFSET, calc_crc32c(memoryview(out)[at:]))
    return bytes(out)


def legacy_corrupt() -> bytes:
    """A gzip-compressed format-v1 batch of three records whose second record's value no longer
    matches its own CRC (the wrapper's CRC made again: only the record's check can tell)."""
    builder = LegacyRecordBatchBuilder(magic=1, compression_type=1, batch_size=1 << 30)
    for i in range(3):
        builder.append(i, timestamp=NOW_MS + i, key=b"k", value=b"value-%d" % i)
    data = bytes(builder.build())
    offset, _, _, magic, attributes, stamp = struct.unpack_from(">qiIbbq", data)
    at = struct.calcsize(">qiIbbq") + 4  # past the wrapper's null key
    (size,) = struct.unpack_from(">i", data, at)
    inner = bytearray(gzip.decompress(data[at + 4 : at + 4 + size]))
    inner[inner.index(b"value-1") + 6] ^= 1
    value = gzip.compress(bytes(inner))
    body = struct.pack(">bbqii", magic, attributes, stamp, -1, len(value)) + value
    message = struct.pack(">I", zlib.crc32(body)) + body
    return struct.pack(">qi", offset, len(message)) + message


@pytest.mark.parametrize(
    ("name", "data", "says"),
    [
        ("crc", v2(plain(3))[:-1] + b"\x01", "failed crc check"),
        ("size", corrupt(v2(plain(3)), longer=True), "Invalid record size"),
        ("count", corrupt(v2(plain(3)), more=True), "invalid record structure"),
        ("legacy record crc", legacy_corrupt(), "failed crc check"),
    ],
)
def test_a_corrupt_batch_is_refused_as_kafka_python_refuses_it(name, data, says):
    """The records before the fault are handed out; the next take raises."""
    seen = []
    for cls in (Fetcher.PartitionRecords, BatchRecords):
        part = cls(0, TP, MemoryRecords(data))
        try:
            first = part.take()
        except CorruptRecordError as exc:
            first, caught = [], exc
        else:
            with pytest.raises(CorruptRecordError) as raised:
                part.take()
            caught = raised.value
        seen.append(
            ([to_record(r) if cls is Fetcher.PartitionRecords else r for r in first], str(caught))
        )
    assert seen[0][0] == seen[1][0]
    assert [says.lower() in message.lower() for _, message in seen] == [True, True], seen


def test_a_consumer_with_deserializers_keeps_kafka_pythons_reading():
    fetcher = SimpleNamespace(PartitionRecords=Fetcher.PartitionRecords)
    assert not read_as_records(
        SimpleNamespace(_fetcher=fetcher, config={"value_deserializer": bytes.decode})
    )
    assert fetcher.PartitionRecords is Fetcher.PartitionRecords
    assert read_as_records(SimpleNamespace(_fetcher=fetcher, config={}))
    assert fetcher.PartitionRecords is BatchRecords


def test_the_worker_s_consumer_reads_a_real_broker_s_batches_into_records(
    kafka_bootstrap, make_topic
):
    topic = make_topic("records", 1)
    # Keys, tombstones (no value) and headers on some: kafka-python refuses a record with neither.
    sent = [
        (
            b"k%d" % i if i % 3 else None,
            None if i % 5 == 0 and i % 3 else b"v" * i,
            [("h", b"%d" % i)] * (i % 2),
        )
        for i in range(300)
    ]
    # Plain batches, then compressed ones.
    for codec, batch in ((None, sent), ("gzip", sent[:20])):
        producer = KafkaProducer(
            bootstrap_servers=kafka_bootstrap, linger_ms=50, compression_type=codec
        )
        for i, (key, value, headers) in enumerate(batch):
            producer.send(topic, key=key, value=value, headers=headers, timestamp_ms=NOW_MS + i)
        producer.flush()
        producer.close()
    config = parse(
        {
            "kafka": {
                "bootstrap_servers": [kafka_bootstrap],
                "topics": [topic],
                "group_id": f"records-{uuid.uuid4().hex[:8]}",
                "dead_letter_topic": f"{topic}.dlq",
            },
            "cloudflare": {
                "accounts": {"a": {}},
                "zones": [{"id": "0" * 32, "hosts": ["example.com"]}],
            },
        },
        "records.yaml",
        {},
    )
    source = KafkaSource(config.kafka)
    try:
        assert source._as_records  # the reading under test, not kafka-python's
        got: list[Record] = []
        deadline = time.monotonic() + 30
        while len(got) < 320 and time.monotonic() < deadline:
            got += source.poll(0.2, 100)
    finally:
        source.close(1.0)
    assert [r.offset for r in got] == list(range(320))
    want = sent + sent[:20]
    assert [(r.key, r.value, r.headers) for r in got] == [(k, v, tuple(h)) for k, v, h in want]
    assert [r.timestamp_ms for r in got] == [NOW_MS + i for i in [*range(300), *range(20)]]
    assert all(type(r) is Record and r.topic == topic and r.partition == 0 for r in got)
