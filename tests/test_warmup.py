"""A takeover's warm-up against a real broker: the past events before the committed offsets refill
the replay buffer and the held-out window; nothing at or after the offsets, and no offset moves."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition

from dynft.batching import LabelMap
from dynft.buffer import ReplayBuffer
from dynft.devbroker import Broker
from dynft.evaluation import HoldoutWindow, is_held_out
from dynft.produce import produce
from dynft.settings import Settings
from dynft.term import task_partition
from dynft.warmup import read_before_committed, refill

from helpers import keyword_events, write_jsonl
from kafka_helpers import damage, end_offsets, kafka_settings, new_topic, publish

pytestmark = pytest.mark.slow
LABELS = ["alpha", "beta", "gamma"]


def test_rewarm_refills_buffer_and_holdout_from_before_the_committed_offsets(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path
) -> None:
    topic, group = new_topic(kafka_broker, partitions=1), f"warm-{uuid.uuid4().hex[:6]}"
    events = keyword_events(80, LABELS, seed=7)
    events[15]["text"] = ""  # a malformed one before the offsets: skipped, never dead-lettered
    publish(kafka_broker, topic, events, tmp_path)
    committer = KafkaConsumer(bootstrap_servers=kafka_broker.bootstrap, group_id=group, enable_auto_commit=False)
    committer.commit({TopicPartition(topic, 0): OffsetAndMetadata(60, "", -1)})
    committer.close()
    settings = kafka_settings(tiny_settings, kafka_broker, topic, group)
    settings.buffer.max_events = 50
    settings.evaluation.holdout_fraction = 0.2
    buffer = ReplayBuffer(settings.buffer.max_events, settings.buffer.max_bytes)
    holdout = HoldoutWindow(100)
    past = read_before_committed(settings)
    assert len(past) == 49  # offsets 10..59, less the malformed one
    refill(past, settings.evaluation.holdout_fraction, buffer, holdout, LabelMap(LABELS))
    expected = [e for e in events[10:60] if e["text"]]
    held = {e["id"] for e in expected if is_held_out(e["id"], e["text"], 0.2)}
    assert held and {e.id for e in holdout.snapshot()} == held
    assert {r["event"]["id"] for r in buffer.snapshot()[0]} == {e["id"] for e in expected} - held
    assert end_offsets(kafka_broker, topic, group)[1] == {0: 60}  # the group's offsets did not move


def test_a_sharded_term_reads_the_past_of_its_own_partitions_only(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path
) -> None:
    topic, group = new_topic(kafka_broker, partitions=2), f"warm-{uuid.uuid4().hex[:6]}"
    path = write_jsonl(tmp_path / "keyed.jsonl", [{**e, "task": "one"} for e in keyword_events(30, LABELS, seed=8)])
    produce(path, [kafka_broker.bootstrap], topic, {}, key_field="task")  # every event on the partition of "one"
    mine = task_partition("one", 2)
    committer = KafkaConsumer(bootstrap_servers=kafka_broker.bootstrap, group_id=group, enable_auto_commit=False)
    committer.commit({TopicPartition(topic, p): OffsetAndMetadata(30 if p == mine else 0, "", -1) for p in (0, 1)})
    committer.close()
    settings = kafka_settings(tiny_settings, kafka_broker, topic, group)
    assert len(read_before_committed(settings, frozenset({mine}))) == 30
    assert read_before_committed(settings, frozenset({1 - mine})) == []


def test_a_corrupt_batch_leaves_its_partition_out_of_the_rebuild(
    kafka_broker: Broker, tiny_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch whose CRC fails (a byte of the broker's log changed) used to end the warm-up with an
    error; the rebuild now goes on without that partition, and says so."""
    topic, group = new_topic(kafka_broker, partitions=2), f"warm-{uuid.uuid4().hex[:6]}"
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all")
    for p in (0, 1):
        for i, event in enumerate(keyword_events(20, LABELS, seed=9 + p)):
            producer.send(
                topic,
                json.dumps({**event, "id": f"p{p}-{i}", "text": f"M{p}{i:02d} " + event["text"]}).encode(),
                partition=p,
            )
        producer.flush()
    producer.close()
    damage(kafka_broker, topic, 0, b"M005", b"N")
    committer = KafkaConsumer(bootstrap_servers=kafka_broker.bootstrap, group_id=group, enable_auto_commit=False)
    committer.commit({TopicPartition(topic, p): OffsetAndMetadata(20, "", -1) for p in (0, 1)})
    committer.close()
    settings = kafka_settings(tiny_settings, kafka_broker, topic, group)
    past = read_before_committed(settings)
    ids = [e.id for e in past]
    assert sorted(i for i in ids if i.startswith("p1-")) == sorted(f"p1-{i}" for i in range(20))
    read_of_0 = [i for i in ids if i.startswith("p0-")]  # the batches before the damaged one
    assert read_of_0 == [f"p0-{i}" for i in range(len(read_of_0))] and len(read_of_0) < 5
    assert any(f"without the rest of {topic}/0" in r.getMessage() for r in caplog.records)
