"""A record whose header name is not UTF-8 is read with replacement characters, as the Java
client reads it, instead of stopping the consumer at every poll (kafka-python 3.0.12).

Such names come from librdkafka-based producers; here kafka-python's own producer writes the
bytes: it encodes a header name with ``name.encode("utf-8")``, so a ``str`` whose ``encode``
returns other bytes puts exactly those on the wire and in the broker's log.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from typing import Any

import pytest
from kafka import KafkaProducer, TopicPartition
from kafka.errors import CorruptRecordError
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from prometheus_client import CollectorRegistry

from dynft.devbroker import Broker
from dynft.loop import TrainingLoop
from dynft.metrics import KafkaMetrics
from dynft.settings import KafkaSettings, Settings
from dynft.sources import Record
from dynft.sources.kafka import KafkaSource
from dynft.sources.kafka_process import KafkaProcessSource
from dynft.sources.kafka_unreadable import apply_read_fixes, read_replacing_names

from kafka_helpers import damage, end_offsets, kafka_settings, ledger_of, new_topic, wait_until

BAD_NAME = b"\xff\xfe-trace"
READ_AS = "\ufffd\ufffd-trace"  # what Python's (and Java's) replacing decoder makes of it


class RawName(str):
    """A header name that kafka-python encodes to bytes that are not UTF-8."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return BAD_NAME


def built_batch(records: list[dict[str, Any]], log_append: bool = False) -> DefaultRecordBatch:
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=False,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    for i, r in enumerate(records):
        builder.append(i, timestamp=1_700_000_000_000 + 7 * i, key=r["key"], value=r["value"], headers=r["headers"])
    data = bytearray(builder.build())
    if log_append:  # the broker sets the timestamp type bit for topics with LogAppendTime
        data[22] |= 0x08  # attributes (int16) at byte 21-22 of a v2 batch
    return DefaultRecordBatch(bytes(data))


def as_tuples(batch: DefaultRecordBatch, read: Any) -> list[tuple[Any, ...]]:
    out = []
    for _ in range(batch._num_records):
        r = read(batch)
        out.append((r.offset, r.timestamp, r.timestamp_type, r.key, r.value, r.headers, r.size_in_bytes))
    assert batch._pos == len(batch._buffer), "a record was read past or short of its length"
    return out


@pytest.mark.parametrize("log_append", [False, True], ids=["create-time", "log-append-time"])
def test_the_lenient_reader_reads_any_valid_record_exactly_as_kafka_python_does(log_append: bool) -> None:
    """Differential: 40 random records (null and empty keys and values, null header values,
    multi-byte names, long values whose lengths take several varint bytes), read by both."""
    apply_read_fixes()
    rng = random.Random(17)

    def blob() -> bytes | None:
        return rng.choice([None, b"", bytes(rng.randrange(256) for _ in range(rng.choice([1, 5, 200, 70_000])))])

    records = [
        {
            "key": blob(),
            "value": blob(),
            "headers": [(rng.choice(["a", "trace-id", "ключ", "名前"]), blob()) for _ in range(rng.randrange(4))],
        }
        for _ in range(40)
    ]
    kafka_python = as_tuples(built_batch(records, log_append), DefaultRecordBatch._read_msg.__wrapped__)
    lenient = as_tuples(built_batch(records, log_append), read_replacing_names)
    assert lenient == kafka_python
    assert len({t[2] for t in lenient}) == 1 and len(lenient) == 40


def test_a_name_that_is_not_utf8_stopped_kafka_python_and_is_now_read_with_replacements() -> None:
    apply_read_fixes()
    records = [
        {"key": b"k0", "value": b"before", "headers": [("ok", b"1")]},
        {"key": None, "value": b"odd", "headers": [("ok", b"2"), (RawName("x"), b"t-9"), ("ok", None)]},
        {"key": b"k2", "value": b"after", "headers": []},
    ]
    with pytest.raises(CorruptRecordError):  # kafka-python's own reader, as 3.0.12 ships it
        for _ in iter_with(built_batch(records), DefaultRecordBatch._read_msg.__wrapped__):
            pass
    got = list(built_batch(records))  # the batch's iterator, through the wrapped reader
    assert [r.value for r in got] == [b"before", b"odd", b"after"]
    assert got[1].headers == [("ok", b"2"), (READ_AS, b"t-9"), ("ok", None)]
    assert [r.offset for r in got] == [0, 1, 2]


def iter_with(batch: DefaultRecordBatch, read: Any) -> Any:
    """The batch's iterator with ``read`` as its record reader (the original, unwrapped one)."""
    original = DefaultRecordBatch._read_msg
    DefaultRecordBatch._read_msg = read  # type: ignore[method-assign]
    try:
        yield from batch
    finally:
        DefaultRecordBatch._read_msg = original  # type: ignore[method-assign]


def test_any_other_fault_of_a_record_still_raises() -> None:
    apply_read_fixes()
    good = built_batch([{"key": None, "value": b"v", "headers": [(RawName("x"), b"1")]}])
    raw = bytearray(good._buffer)
    assert raw[-2:] == bytearray([2]) + b"1"  # the header value's length (1, zig-zag) and the value
    raw[-2] = 126  # a length of 63: more bytes than the record has
    with pytest.raises(CorruptRecordError):
        list(DefaultRecordBatch(bytes(raw)))


def produce_with_bad_name(broker: Broker, topic: str, n: int, bad_at: list[int]) -> None:
    """``n`` events to partition 0 in one batch (linger), those at ``bad_at`` with a bad header name."""
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=500)
    try:
        for i in range(n):
            headers = [("trace", f"t{i}".encode())]
            if i in bad_at:
                headers.append((RawName("x"), b"v"))
            row = {"id": f"e{i}", "text": f"text {i}", "label": "ab"[i % 2]}
            producer.send(topic, value=json.dumps(row).encode(), partition=0, headers=headers)
        producer.flush()
    finally:
        producer.close()


def drain(source: KafkaSource | KafkaProcessSource, want: int, patience_s: float = 60.0) -> list[Record]:
    out: list[Record] = []
    deadline = time.monotonic() + patience_s
    while len(out) < want and time.monotonic() < deadline:
        out.extend(source.poll(50, 0.1))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("process", [False, True], ids=["in-process", "consumer-process"])
def test_every_record_of_a_batch_with_a_bad_header_name_comes_through(kafka_broker: Broker, process: bool) -> None:
    """The bad names sit first, inside and last in a batch of 30: every record arrives, in order,
    with its own headers (the bad name replaced), and the source is still polling afterwards."""
    topic = new_topic(kafka_broker, partitions=1)
    produce_with_bad_name(kafka_broker, topic, 30, bad_at=[0, 13, 29])
    uri = f"kafka://{kafka_broker.bootstrap}/{topic}?group=h-{uuid.uuid4().hex[:6]}"
    source: KafkaSource | KafkaProcessSource
    if process:
        source = KafkaProcessSource(uri, KafkaSettings(), CollectorRegistry())
    else:
        source = KafkaSource(uri, KafkaSettings(), KafkaMetrics(CollectorRegistry()))
    source.open()
    try:
        got = drain(source, 30)
        assert [json.loads(r.raw)["id"] for r in got] == [f"e{i}" for i in range(30)]
        assert [r.next for r in got] == list(range(1, 31))
        for i, r in enumerate(got):
            extra = [(READ_AS, b"v")] if i in (0, 13, 29) else []
            assert r.headers == [("trace", f"t{i}".encode()), *extra]
        produce_with_bad_name(kafka_broker, topic, 2, bad_at=[1])
        assert [json.loads(r.raw)["id"] for r in drain(source, 2)] == ["e0", "e1"]
    finally:
        source.close()


def send_rows(broker: Broker, topic: str, rows: dict[int, range]) -> None:
    """Rows ``{"id": "p<partition>-<i>", "text": "MARK<partition><i:02d>"}``, one batch per partition."""
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=200)
    try:
        for p, numbers in rows.items():
            for i in numbers:
                row = {"id": f"p{p}-{i}", "text": f"MARK{p}{i:02d}", "label": "a"}
                producer.send(topic, value=json.dumps(row).encode(), partition=p)
            producer.flush()
    finally:
        producer.close()


@pytest.mark.slow
@pytest.mark.parametrize("process", [False, True], ids=["in-process", "consumer-process"])
def test_a_corrupt_batch_holds_its_partition_only_and_reads_once_repaired(
    kafka_broker: Broker, process: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Produced for real: a byte of partition 0's log segment is changed, so its second batch fails
    the CRC check. Before, the error stopped the intake, and a poll after it spun at full CPU for
    ever. Now partition 0's first batch and all of partition 1 are read while partition 0 is held
    and retried with backoff (counted, said once, no record skipped), and once the segment is
    repaired the rest of partition 0 reads too, in order."""
    topic = new_topic(kafka_broker, partitions=2)
    send_rows(kafka_broker, topic, {0: range(5)})  # a good batch before the damaged one, in the same fetch
    send_rows(kafka_broker, topic, {0: range(5, 20), 1: range(20)})
    damage(kafka_broker, topic, 0, b"MARK010", b"N")
    registry = CollectorRegistry()
    uri = f"kafka://{kafka_broker.bootstrap}/{topic}?group=c-{uuid.uuid4().hex[:6]}"
    source: KafkaSource | KafkaProcessSource
    if process:
        source = KafkaProcessSource(uri, KafkaSettings(), registry)
    else:
        source = KafkaSource(uri, KafkaSettings(), KafkaMetrics(registry))

    def tries() -> float:
        return registry.get_sample_value("dynft_kafka_unreadable_total", {"topic": topic, "partition": "0"}) or 0

    source.open()
    try:
        first = drain(source, 25)
        assert sorted(json.loads(r.raw)["id"] for r in first) == sorted(
            [f"p0-{i}" for i in range(5)] + [f"p1-{i}" for i in range(20)]
        )
        deadline = time.monotonic() + 30
        while tries() < 3 and time.monotonic() < deadline:  # held after 0, 1 and 3 s
            first += source.poll(50, 0.1)
        assert 3 <= tries() <= 4, "retried with doubling waits, not at every poll"
        assert len(first) == 25
        if isinstance(source, KafkaSource) and source._consumer is not None:  # backpressure comes and goes
            source.pause()
            assert registry.get_sample_value("dynft_kafka_paused_partitions") == 1  # the held one is not counted
            source.resume()
            assert source._consumer.paused() == {TopicPartition(topic, 0)}, "a resume ended the hold early"
        damage(kafka_broker, topic, 0, b"NARK010", b"M")
        second = drain(source, 15, patience_s=30.0)
        assert [json.loads(r.raw)["id"] for r in second] == [f"p0-{i}" for i in range(5, 20)]
        assert [r.next for r in second] == list(range(6, 21))
    finally:
        source.close()
    said = [r.getMessage() for r in caplog.records if "cannot read the records" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"{topic}/0:")
    assert any(f"{topic}/0 reads again after" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_the_daemon_learns_through_a_record_with_a_bad_header_name(
    kafka_broker: Broker, tiny_settings: Settings
) -> None:
    """The way a user met it: such a record in the topic stopped the training loop ("source ...
    failed") and every restart. Every event is now trained on or held out, offsets committed."""
    topic, group = new_topic(kafka_broker, partitions=1), f"g-{uuid.uuid4().hex[:6]}"
    produce_with_bad_name(kafka_broker, topic, 60, bad_at=[7, 30])
    settings = kafka_settings(tiny_settings, kafka_broker, topic, group)
    loop = TrainingLoop(settings, CollectorRegistry())
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: end_offsets(kafka_broker, topic, group)[1] == {0: 60}, 180, "every offset committed")
    finally:
        loop.should_exit.set()
        thread.join(120)
    statuses = ledger_of(settings.state_dir).lookup(f"e{i}" for i in range(60))
    assert len(statuses) == 60 and {s for s, _ in statuses.values()} <= {"trained", "held_out"}
