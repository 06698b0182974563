"""Records kafka-python 3.0 cannot read: a header name that is not UTF-8, a batch that is corrupt.

**Header names.** A header name is a string in Kafka's record format, and the broker stores
whatever bytes a producer sends: librdkafka-based clients (Go, .NET, confluent-kafka-python)
take header names as C strings and can write bytes that are not UTF-8. The Java client reads
such a name with replacement characters. kafka-python 3.0.12 decodes it strictly, and the
``UnicodeDecodeError`` becomes a ``CorruptRecordError`` at every poll, so one such record
stopped the daemon's intake for good (a restart met it again). Skipping it from outside is
no answer: kafka-python parses a record batch from its start, so every good record after it
in the batch would be lost. The batch's record reader is wrapped: a record it cannot read
because of a header name is read again here, from the record format of the Kafka protocol
guide (record v2), with the name's bad bytes replaced by U+FFFD as the Java client does.
Every other record goes through kafka-python's reader untouched; the wrapper costs about
0.15 us a record (reading a record of 130 bytes: 1.95 -> 2.10 us on the 2-core CI machine).

**Corrupt batches.** A batch whose CRC does not match (damaged on the wire, or in a broker's
log, which the broker serves without checking) or a record malformed in any other way still
raises ``CorruptRecordError``, and the next ``poll`` then spun at full CPU for ever: the
partition's exhausted record iterator stays "not drained" (its iterator is not ``None``), so
``Fetcher.fetched_records`` takes nothing from it again and again. The iterator is drained
when it raises, and the error names its partition (``partition_of``). ``Holds`` then
pauses just that partition and retries it with backoff: a batch damaged on the way reads
the next time, one damaged in the broker's log stays held, said in the log and counted in
``dynft_kafka_unreadable_total``, while the other partitions go on. Nothing is skipped. The
same holds for any other error raised while reading a partition's records (a compressed
batch that does not decompress), except a codec this install lacks, which fails every batch
of that codec and stops the intake as before.

``tests/sources/test_kafka_unreadable.py`` writes such names and damages a log segment of the
real broker.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import Fetcher
from kafka.record.default_records import ControlRecord, DefaultRecord, DefaultRecordBatch
from kafka.record.util import decode_varint

from dynft.backoff import Backoff
from dynft.sources.kafka_compat import fits_version

log = logging.getLogger(__name__)
_MARK = "_dynft_read_fix"
_PARTITION_ATTR = "dynft_partition"  # set on an error raised while reading a partition's fetched records
HOLD_FIRST_S = 1.0
HOLD_MAX_S = 60.0


def apply_read_fixes() -> bool:
    """Wrap the record reader and the fetched records' ``take`` once; whether they are in place."""
    if getattr(DefaultRecordBatch._read_msg, _MARK, False):
        return True
    if not fits_version("the 3.0 fixes for unreadable records"):
        return False
    _read_names_leniently()
    _drain_what_raised()
    return True


def _read_names_leniently() -> None:
    original = DefaultRecordBatch._read_msg

    def _read_msg(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = self._pos
        try:
            return original(self, *args, **kwargs)
        except UnicodeDecodeError:  # the only text in a v2 record is a header name
            self._pos = start
            return read_replacing_names(self)

    setattr(_read_msg, _MARK, True)
    _read_msg.__wrapped__ = original  # type: ignore[attr-defined]  # kafka-python's own, for tests
    DefaultRecordBatch._read_msg = _read_msg  # type: ignore[method-assign]


def _drain_what_raised() -> None:
    records = Fetcher.PartitionRecords
    original = records.take

    def take(self: Any, n: int | None = None) -> Any:
        try:
            return original(self, n)
        except Exception as exc:
            # The iterator has ended by raising; left in place, the next poll would spin on it.
            self.drain()
            setattr(exc, _PARTITION_ATTR, self.topic_partition)
            raise

    take.__wrapped__ = original  # type: ignore[attr-defined]
    records.take = take


def partition_of(exc: BaseException) -> TopicPartition | None:
    """The partition whose fetched records raised ``exc``, where the fixes above named it."""
    tp = getattr(exc, _PARTITION_ATTR, None)
    return tp if isinstance(tp, TopicPartition) else None


class Holds:
    """Partitions whose fetched records could not be read: paused, retried with doubling backoff.

    Owned by the polling thread. A hold ends when its time is up (the partition is resumed
    unless the whole source is paused for backpressure); the backoff starts again once the
    partition's records read.
    """

    def __init__(self) -> None:
        self._until: dict[TopicPartition, float] = {}  # held until then
        self._backoff: dict[TopicPartition, Backoff] = {}  # while the partition does not read

    @property
    def held(self) -> set[TopicPartition]:
        """Paused now for records that could not be read."""
        return set(self._until)

    @property
    def unreadable(self) -> set[TopicPartition]:
        """Not read since their last failed fetch (held or being tried again)."""
        return set(self._backoff)

    def hold(self, consumer: KafkaConsumer, tp: TopicPartition) -> tuple[float, int]:
        """Pause ``tp`` (an assigned partition); the seconds until it is tried again, and the tries so far."""
        backoff = self._backoff.setdefault(tp, Backoff(HOLD_FIRST_S, HOLD_MAX_S))
        wait = backoff.failed()
        self._until[tp] = time.monotonic() + wait
        consumer.pause(tp)
        return wait, backoff.failures

    def release_due(self, consumer: KafkaConsumer, source_paused: bool) -> None:
        now = time.monotonic()
        for tp in [tp for tp, until in self._until.items() if until <= now]:
            del self._until[tp]
            if not source_paused and tp in consumer.assignment():
                consumer.resume(tp)

    def read(self, tp: TopicPartition) -> int:
        """Records of ``tp`` were read: the failed tries before (0 if none); a later fault waits from 1 s again."""
        backoff = self._backoff.pop(tp, None)
        return backoff.failures if backoff is not None else 0


def read_replacing_names(batch: Any) -> DefaultRecord:
    """Read the record at ``batch._pos`` as kafka-python does, but decode header names leniently.

    Record => Length Attributes TimestampDelta OffsetDelta Key Value [HeaderKey HeaderValue]:
    lengths and deltas are zig-zag varints, Attributes one byte, a length of -1 is null.
    A record that is wrong in any other way raises ``ValueError`` (or ``IndexError`` from a
    varint cut short), which the batch's iterator turns into ``CorruptRecordError`` as before.
    """
    buffer, pos = batch._buffer, batch._pos
    length, pos = decode_varint(buffer, pos)
    start = pos
    pos += 1  # Attributes: unused in record v2
    ts_delta, pos = decode_varint(buffer, pos)
    offset_delta, pos = decode_varint(buffer, pos)
    key, pos = _nullable_bytes(buffer, pos)
    value, pos = _nullable_bytes(buffer, pos)
    count, pos = decode_varint(buffer, pos)
    if count < 0:
        raise ValueError(f"negative header count {count}")
    headers: list[tuple[str, bytes | None]] = []
    for _ in range(count):
        name, pos = _nullable_bytes(buffer, pos)
        if name is None:
            raise ValueError("a header without a name")
        header_value, pos = _nullable_bytes(buffer, pos)
        headers.append((name.decode("utf-8", errors="replace"), header_value))
    if pos - start != length:
        raise ValueError(f"record of {length} bytes read as {pos - start}")
    batch._pos = pos
    if batch.timestamp_type == batch.LOG_APPEND_TIME:
        timestamp = batch.max_timestamp
    else:
        timestamp = batch.first_timestamp + ts_delta
    kind = ControlRecord if batch.is_control_batch else DefaultRecord
    return kind(length, batch.base_offset + offset_delta, timestamp, batch.timestamp_type, key, value, headers)


def _nullable_bytes(buffer: Any, pos: int) -> tuple[bytes | None, int]:
    size, pos = decode_varint(buffer, pos)
    if size < 0:
        return None, pos
    if pos + size > len(buffer):
        raise ValueError(f"{size} bytes announced, {len(buffer) - pos} left")
    return bytes(buffer[pos : pos + size]), pos + size
