"""The consumer's fetched batches read straight into the worker's ``Record``s, a batch at a time.

kafka-python reads a fetched batch record by record through a chain of Python calls: one call
per varint field, a record object with a property per field, a ``ConsumerRecord`` of thirteen
fields, and then the worker made its ``Record`` of that. Draining a backlog, that was the
largest part of the loop's time (4.5 µs a record, of about 10). ``BatchRecords`` reads a batch
of message format v2 (every Kafka since 0.11) in one loop, one-byte varints decoded in place,
and hands the worker's ``Record``s to kafka-python's fetcher, which passes them through to
``poll`` untouched. What kafka-python does around the records is kept as it does it: each
batch's CRC checked, aborted transactions' batches and control batches passed over, the fetch
position moved past each record handed out, a record of the wrong size refused as corrupt.
Batches of the older formats are read record by record, as before.

``read_as_records`` installs it on one consumer (the worker's group member); a kafka-python
whose fetcher differs from the one this mirrors is left as it is, and ``poll`` then makes
each ``Record`` itself.
"""

from __future__ import annotations

from typing import Any

from kafka.consumer.fetcher import Fetcher, IsolationLevel
from kafka.errors import CorruptRecordError
from kafka.record.default_records import DefaultRecordBatch
from kafka.record.util import decode_varint as varint

from worker.events import Record

_Base: Any = getattr(Fetcher, "PartitionRecords", object)
# What ``BatchRecords`` uses of kafka-python's batches and of the class it extends.
_BASE_NEEDS = (
    "_consume_aborted_transactions_up_to",
    "_contains_abort_marker",
    "_is_batch_aborted",
    "drain",
)
_BATCH_NEEDS = ("_buffer", "_pos", "_num_records")
_make = tuple.__new__  # a named tuple's own constructor is a Python call: twice the time


class BatchRecords(_Base):  # type: ignore[misc]
    """kafka-python's ``Fetcher.PartitionRecords`` handing out ``Record``s (see the module)."""

    def _unpack_records(self, tp: Any, records: Any, key_des: Any, value_des: Any) -> Any:
        topic, partition = tp.topic, tp.partition
        try:
            batch = records.next_batch()
            last = None
            while batch is not None:
                last = batch
                if self.check_crcs and not batch.validate_crc():
                    raise CorruptRecordError(
                        f"Record batch for partition {tp} at offset {batch.base_offset} failed "
                        "crc check"
                    )
                if batch.magic == 2:
                    self.leader_epoch = batch.leader_epoch
                    if self._passed_over(batch):
                        self.next_fetch_offset = batch.next_offset
                        batch = records.next_batch()
                        continue
                    read, error = read_batch(batch, topic, partition)
                else:
                    read, error = self._read_legacy(batch, topic, partition)
                self.records_read += len(read)
                self.bytes_read += batch.size_in_bytes
                for record in read:
                    self.next_fetch_offset = record[2] + 1
                    yield record
                if error is not None:  # after the records before it, as kafka-python does
                    raise error
                batch = records.next_batch()
            # Format v2 keeps a batch's last offset even when compaction removed its record:
            # the next fetch starts past it, not at a record no longer there.
            if last is not None and last.magic == 2:
                self.next_fetch_offset = last.next_offset
            self.drain()
        except StopIteration:
            # Raised inside a generator it would end the records silently (PEP 479).
            raise RuntimeError("StopIteration raised unpacking a record batch") from None

    def _passed_over(self, batch: Any) -> bool:
        """Whether ``batch`` hands out no records: a control batch, or one of an aborted
        transaction (read committed)."""
        if self.isolation_level == IsolationLevel.READ_COMMITTED and batch.has_producer_id():
            self._consume_aborted_transactions_up_to(batch.last_offset)
            if self._contains_abort_marker(batch):
                self.aborted_producer_ids.discard(batch.producer_id)
            elif self._is_batch_aborted(batch):
                return True
        return bool(batch.is_control_batch)

    def _read_legacy(
        self, batch: Any, topic: str, partition: int
    ) -> tuple[list[Record], CorruptRecordError | None]:
        """``read_batch`` for the formats before v2, record by record as kafka-python reads them."""
        out: list[Record] = []
        for r in batch:
            if self.check_crcs and not r.validate_crc():
                return out, CorruptRecordError(
                    f"Record for partition {topic}-{partition} at offset {r.offset} failed crc "
                    "check"
                )
            headers = tuple(h) if (h := r.headers) else ()
            out.append(Record(topic, partition, r.offset, r.key, r.value, headers, r.timestamp))
        return out, None


def read_batch(
    batch: Any, topic: str, partition: int
) -> tuple[list[Record], CorruptRecordError | None]:
    """The records of a format-v2 ``batch`` (kafka-python's ``DefaultRecordBatch``, not read
    yet), and the ``CorruptRecordError`` kafka-python's own reading would raise after them."""
    iter(batch)  # decompresses the batch's records, if they are compressed
    data = bytes(batch._buffer)  # slices of bytes are the values themselves: one copy each
    pos, count = batch._pos, batch._num_records
    base, first_ts = batch.base_offset, batch.first_timestamp
    append_ts = batch.max_timestamp if batch.timestamp_type == 1 else None
    out: list[Record] = []
    add = out.append
    try:
        for _ in range(count):
            # Every varint here is zigzag-encoded; most fit one byte, decoded in place.
            b = data[pos]
            length, pos = ((b >> 1) ^ -(b & 1), pos + 1) if b < 0x80 else varint(data, pos)
            start = pos
            b = data[pos + 1]  # after the attributes: one byte, unused by any format yet
            ts, pos = ((b >> 1) ^ -(b & 1), pos + 2) if b < 0x80 else varint(data, pos + 1)
            b = data[pos]
            delta, pos = ((b >> 1) ^ -(b & 1), pos + 1) if b < 0x80 else varint(data, pos)
            b = data[pos]
            size, pos = ((b >> 1) ^ -(b & 1), pos + 1) if b < 0x80 else varint(data, pos)
            key = None
            if size >= 0:
                key, pos = data[pos : pos + size], pos + size
            b = data[pos]
            size, pos = ((b >> 1) ^ -(b & 1), pos + 1) if b < 0x80 else varint(data, pos)
            value = None
            if size >= 0:
                value, pos = data[pos : pos + size], pos + size
            headers: tuple[tuple[str, bytes | None], ...] = ()
            if data[pos] == 0:  # no headers: the usual case
                pos += 1
            else:
                headers, pos = _headers(data, pos)
            if pos - start != length:
                return out, CorruptRecordError(
                    f"Invalid record size: expected to read {length} bytes in record payload, "
                    f"but instead read {pos - start}"
                )
            ts = first_ts + ts if append_ts is None else append_ts
            add(_make(Record, (topic, partition, base + delta, key, value, headers, ts, None, 0)))
    except CorruptRecordError as exc:  # of its headers
        return out, exc
    except (IndexError, ValueError) as exc:
        return out, CorruptRecordError(f"Found invalid record structure: {exc!r}")
    if pos != len(data):
        unread = len(data) - pos
        return out, CorruptRecordError(f"{unread} unconsumed bytes after all records consumed")
    return out, None


def _headers(data: bytes, pos: int) -> tuple[tuple[tuple[str, bytes | None], ...], int]:
    count, pos = varint(data, pos)
    if count < 0:
        raise CorruptRecordError(f"Found invalid number of record headers {count}")
    headers = []
    for _ in range(count):
        size, pos = varint(data, pos)
        if size < 0:
            raise CorruptRecordError(f"Invalid negative header key size {size}")
        key, pos = data[pos : pos + size].decode("utf-8"), pos + size
        size, pos = varint(data, pos)
        value = None
        if size >= 0:
            value, pos = data[pos : pos + size], pos + size
        headers.append((key, value))
    return tuple(headers), pos


def read_as_records(consumer: Any) -> bool:
    """Make ``consumer``'s polls hand out ``Record``s (``BatchRecords``). Returns whether they
    do: not for a consumer with deserializers, nor a kafka-python whose fetcher differs."""
    fetcher = getattr(consumer, "_fetcher", None)
    config = getattr(consumer, "config", {})
    if (
        fetcher is None
        or _Base is object
        or config.get("key_deserializer") is not None
        or config.get("value_deserializer") is not None
        or not all(hasattr(_Base, name) for name in _BASE_NEEDS)
        or not all(name in getattr(DefaultRecordBatch, "__slots__", ()) for name in _BATCH_NEEDS)
    ):
        return False
    fetcher.PartitionRecords = BatchRecords
    return True
