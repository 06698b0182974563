"""Partitions added to a topic while the daemon consumes it, against the real broker.

A topic outgrows its partitions and an operator adds some; producers start writing to them at
once. The consumer learns of them only when it reads the topic's metadata again, every
``kafka.metadata_max_age_ms`` (kafka-python's default, 5 minutes, left those records unread
that long): then the group rebalances and the new partitions are consumed from their start.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewPartitions
from prometheus_client import CollectorRegistry

from dynft.devbroker import Broker
from dynft.metrics import KafkaMetrics
from dynft.settings import KafkaSettings
from dynft.sources.kafka import KafkaSource

from kafka_helpers import new_topic, publish


def drain(source: KafkaSource, want: int, timeout_s: float) -> list[tuple[str, int]]:
    """(id, partition) of the records polled until ``want`` arrived or the time is up."""
    got: list[tuple[str, int]] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        got += [(json.loads(r.raw)["id"], int(r.stream.rpartition("/")[2])) for r in source.poll(100, 0.5)]
    return got


def test_records_of_a_partition_added_while_consuming_are_consumed(kafka_broker: Broker, tmp_path: Path) -> None:
    topic = new_topic(kafka_broker, partitions=1)
    rows = [{"id": f"r{i}", "text": f"w{i}", "label": "a"} for i in range(10)]
    publish(kafka_broker, topic, rows[:5], tmp_path)
    settings = KafkaSettings(metadata_max_age_ms=2000)
    source = KafkaSource(
        f"kafka://{kafka_broker.bootstrap}/{topic}?group=grown", settings, KafkaMetrics(CollectorRegistry())
    )
    source.open()
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    try:
        assert sorted(i for i, _ in drain(source, 5, 60)) == [f"r{i}" for i in range(5)]
        admin.create_partitions({topic: NewPartitions(total_count=2)})
        for row in rows[5:]:  # written to the new partition only, as a producer keyed onto it would
            producer.send(topic, json.dumps(row).encode(), partition=1)
        producer.flush()
        got = drain(source, 5, 30)  # six metadata refreshes; kafka-python's default waits 300 s
        assert sorted(got) == [(f"r{i}", 1) for i in range(5, 10)]
    finally:
        producer.close()
        admin.close()
        source.close()
