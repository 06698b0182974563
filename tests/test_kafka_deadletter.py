"""Dead letters on Kafka are delivered, or the offsets they cover are not committed (issue #12, item 3)."""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from prometheus_client import CollectorRegistry

from dynft.deadletter import read_dead_letters
from dynft.devbroker import Broker
from dynft.loop import TrainingLoop
from dynft.settings import Settings

from helpers import keyword_events
from kafka_helpers import end_offsets, kafka_settings, ledger_of, wait_until

pytestmark = pytest.mark.slow
LABELS = ["alpha", "beta", "gamma"]
StartLoop = Callable[[Settings, CollectorRegistry], TrainingLoop]


@pytest.fixture
def start_loop() -> Iterator[StartLoop]:
    """Starts loops in threads; each is stopped (writing its last checkpoint) when the test ends."""
    loops: list[tuple[TrainingLoop, threading.Thread]] = []

    def start(settings: Settings, metrics: CollectorRegistry) -> TrainingLoop:
        loop = TrainingLoop(settings, metrics)
        thread = threading.Thread(target=loop.run, daemon=True)
        thread.start()
        loops.append((loop, thread))
        return loop

    yield start
    for loop, thread in loops:
        loop.should_exit.set()
        thread.join(120)


def create_topic(broker: Broker, topic: str, max_message_bytes: int) -> None:
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        config = {"max.message.bytes": str(max_message_bytes)}
        admin.create_topics({topic: {"num_partitions": 1, "replication_factor": -1, "configs": config}})
    finally:
        admin.close()


def send(broker: Broker, topic: str, values: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=8 << 20, acks="all")
    try:
        for value in values:
            producer.send(topic, value=value)
        producer.flush()
    finally:
        producer.close()


def dead_letters(broker: Broker, topic: str) -> list[Any]:
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=broker.bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
        max_partition_fetch_bytes=4 << 20,
    )
    try:
        return list(consumer)
    finally:
        consumer.close()


def test_a_2_mib_record_is_dead_lettered_as_its_hash_size_and_prefix_and_its_offset_committed(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path, start_loop: StartLoop
) -> None:
    """The dead-letter producer's request limit is 1 MiB; the source topic takes 3 MiB records. The
    2 MiB record (over events.max_record_bytes) cannot go to the dead-letter topic whole: it goes as
    its first bytes with its sha256 and size in a header, and the partition is committed past it."""
    topic, group = f"big-{uuid.uuid4().hex[:8]}", "big"
    create_topic(kafka_broker, topic, 3 << 20)
    events = keyword_events(150, LABELS, seed=71)
    huge = b'{"id": "huge", "label": "alpha", "text": "' + b"x" * (2 << 20) + b'"}'
    rows = [json.dumps(e).encode() for e in events]
    send(kafka_broker, topic, [*rows[:75], huge, *rows[75:]])
    settings = kafka_settings(tiny_settings, kafka_broker, topic, group)
    settings.kafka.dlq_max_request_bytes = 1 << 20
    settings.kafka.max_partition_fetch_bytes = 4 << 20
    start_loop(settings, CollectorRegistry())

    def drained() -> bool:
        ends, committed = end_offsets(kafka_broker, topic, group)
        return committed == ends

    wait_until(drained, 180, "the committed offset to pass the 2 MiB record")
    letters = dead_letters(kafka_broker, f"{topic}.dlq")
    assert len(letters) == 1
    headers = dict(letters[0].headers)
    assert headers["dynft.truncated"].decode() == f"sha256={hashlib.sha256(huge).hexdigest()} size={len(huge)}"
    assert headers["dynft.source.offset"] == b"75"
    assert headers["dynft.reason"] == b"record_too_large"
    assert 0 < len(letters[0].value) <= 64 << 10 and huge.startswith(letters[0].value)
    statuses = ledger_of(settings.state_dir).lookup(e["id"] for e in events)
    assert {s for s, _ in statuses.values()} <= {"trained", "held_out"}


@pytest.mark.parametrize("dlq_max_bytes", [1024, 100], ids=["stub-in-the-topic", "stub-refused-too"])
def test_a_dead_letter_the_broker_refuses_for_good_goes_as_a_stub_or_to_the_local_file(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path, start_loop: StartLoop, dlq_max_bytes: int
) -> None:
    """Produced for real: the dead-letter topic's max.message.bytes refuses the 4 KiB hostile
    record's dead letter for good. It blocked every checkpoint for ever (found by a review: no
    checkpoint, no ledger, for as long as the daemon ran). It now goes as a stub (no value, the
    original's hash and size in ``dynft.truncated``); a stub refused too goes to the state
    directory's dead-letter file. Either way the checkpoints go on and the offsets are committed."""
    topic, group = f"refused-{uuid.uuid4().hex[:8]}", "refused"
    create_topic(kafka_broker, topic, 1 << 20)
    create_topic(kafka_broker, f"{topic}.dlq", dlq_max_bytes)
    events = keyword_events(150, LABELS, seed=72)
    hostile = b"{not json " + b"y" * 4096
    send(kafka_broker, topic, [hostile, *(json.dumps(e).encode() for e in events)])
    settings = kafka_settings(tiny_settings, kafka_broker, topic, group)
    start_loop(settings, CollectorRegistry())

    wait_until(
        lambda: end_offsets(kafka_broker, topic, group)[1] == {0: len(events) + 1}, 180, "every offset committed"
    )
    letters = dead_letters(kafka_broker, f"{topic}.dlq")
    local = [e for e in read_dead_letters(settings.dead_letter_path)] if settings.dead_letter_path.exists() else []
    if dlq_max_bytes == 1024:
        (letter,) = letters
        headers = dict(letter.headers)
        assert letter.value == b"" and headers["dynft.reason"] == b"malformed_json"
        assert (
            headers["dynft.truncated"] == f"sha256={hashlib.sha256(hostile).hexdigest()} size={len(hostile)}".encode()
        )
        assert local == []
    else:
        assert letters == []
        (entry,) = local
        assert entry["raw_bytes"] == hostile and entry["reason"] == "malformed_json"
    assert ledger_of(settings.state_dir).counts()["trained"] > 0


def test_a_dead_letter_whose_key_or_headers_pass_the_request_limit_goes_as_a_stub(
    kafka_broker: Broker, tiny_settings: Settings, start_loop: StartLoop
) -> None:
    """Found by a probe: a malformed record with a 1.5 MB header (or key) made a dead letter the
    producer refused before sending (MessageSizeTooLargeError), which was taken for an outage and
    retried for ever: no checkpoint, no commit, after every restart too. It now goes as a stub
    without the record's own headers and without a key that large."""
    topic, group = f"bighdr-{uuid.uuid4().hex[:8]}", "bighdr"
    create_topic(kafka_broker, topic, 4 << 20)
    events = keyword_events(60, LABELS, seed=9)
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, max_request_size=8 << 20, acks="all")
    try:
        big = b"h" * 1_500_000
        producer.send(topic, value=b"{not json 1", headers=[("trace", big), ("small", b"s")])
        producer.send(topic, value=b"{not json 2", key=big)
        for event in events:
            producer.send(topic, value=json.dumps(event).encode())
        producer.flush()
    finally:
        producer.close()
    settings = kafka_settings(tiny_settings, kafka_broker, topic, group)
    start_loop(settings, CollectorRegistry())

    wait_until(
        lambda: end_offsets(kafka_broker, topic, group)[1] == {0: len(events) + 2}, 180, "every offset committed"
    )
    letters = dead_letters(kafka_broker, f"{topic}.dlq")
    assert [dict(letter.headers)["dynft.source.offset"] for letter in letters] == [b"0", b"1"]
    for letter in letters:
        headers = dict(letter.headers)
        assert letter.value == b"" and letter.key is None and headers["dynft.reason"] == b"malformed_json"
        assert "trace" not in headers and "small" not in headers and headers["dynft.truncated"].startswith(b"sha256=")


@pytest.mark.parametrize("consumer_process", [False, True], ids=["in-process", "consumer-process"])
def test_a_dead_letter_keeps_the_records_own_headers_and_says_why_once(
    kafka_broker: Broker, tiny_settings: Settings, start_loop: StartLoop, consumer_process: bool
) -> None:
    """Trace ids and the like stay with a rejected record; an original header of the letters' own
    names (a letter sent back by hand and rejected again) does not make two of them."""
    topic, group = f"hdr-{uuid.uuid4().hex[:8]}", "hdr"
    create_topic(kafka_broker, topic, 1 << 20)
    rows = [json.dumps(e).encode() for e in keyword_events(40, LABELS, seed=5)]
    send(kafka_broker, topic, rows[:20])
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all")
    try:
        own = [("trace-id", b"t-42"), ("dynft.reason", b"spoofed"), ("empty", b"")]
        producer.send(topic, value=b"{not json", key=b"k1", headers=own)
        producer.flush()
    finally:
        producer.close()
    send(kafka_broker, topic, rows[20:])
    settings = kafka_settings(tiny_settings, kafka_broker, topic, group)
    settings.kafka.consumer_process = consumer_process
    start_loop(settings, CollectorRegistry())

    def drained() -> bool:
        ends, committed = end_offsets(kafka_broker, topic, group)
        return committed == ends

    wait_until(drained, 180, "the committed offset to pass the malformed record")
    (letter,) = dead_letters(kafka_broker, f"{topic}.dlq")
    assert letter.value == b"{not json" and letter.key == b"k1"
    assert letter.headers[:2] == [("trace-id", b"t-42"), ("empty", b"")]  # first, as they came
    assert [v for k, v in letter.headers if k == "dynft.reason"] == [b"malformed_json"]
    assert dict(letter.headers)["dynft.source.offset"] == b"20"
