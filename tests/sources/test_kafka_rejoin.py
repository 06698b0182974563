"""The Kafka source's way out of a stuck rejoin, against the real broker.

The stall itself (kafka-python 3.0 revoking a member's partitions and never rejoining) cannot
be produced on demand, so the test injects only its symptom: the time of the last revocation
is set back past the limit. Everything after that is real: the consumer is closed, a new one
joins the group, gets the partitions and continues from the committed offsets.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from dynft.devbroker import Broker
from dynft.metrics import KafkaMetrics
from dynft.settings import KafkaSettings
from dynft.sources.kafka import KafkaSource

from kafka_helpers import new_topic, publish


def drain(source: KafkaSource, want: int, timeout_s: float = 60.0) -> list[str]:
    ids: list[str] = []
    deadline = time.monotonic() + timeout_s
    while len(ids) < want and time.monotonic() < deadline:
        ids += [json.loads(r.raw)["id"] for r in source.poll(100, 0.5)]
    return ids


def test_a_stuck_rejoin_is_abandoned_for_a_new_consumer_that_continues_from_the_commits(
    kafka_broker: Broker, tmp_path: Path
) -> None:
    topic = new_topic(kafka_broker)
    rows = [{"id": f"r{i}", "text": f"w{i}", "label": "a"} for i in range(60)]
    publish(kafka_broker, topic, rows[:30], tmp_path)
    settings = KafkaSettings(max_poll_interval_ms=1000, session_timeout_ms=6000)
    source = KafkaSource(
        f"kafka://{kafka_broker.bootstrap}/{topic}?group=rejoin", settings, KafkaMetrics(CollectorRegistry())
    )
    source.open()
    try:
        first = drain(source, 30)
        assert sorted(first) == sorted(r["id"] for r in rows[:30])
        ends = _ends(source, topic)
        source.commit({f"{topic}/{p}": o for p, o in ends.items()})
        deadline = time.monotonic() + 30
        while len(source._offsets.committed) < len(ends) and time.monotonic() < deadline:
            assert source.poll(10, 0.5) == []  # the commit runs (asynchronously) on the polling thread
        old = source._consumer
        source._revoked_at = time.monotonic() - 60  # the injected symptom: revoked long ago, never reassigned
        publish(kafka_broker, topic, rows[30:], tmp_path)
        second = drain(source, 30)
        assert source._consumer is not old, "a new consumer was not started"
        assert sorted(second) == sorted(r["id"] for r in rows[30:]), (
            "the new consumer did not continue from the commits"
        )
        assert source._revoked_at is None
    finally:
        source.close()


def _ends(source: KafkaSource, topic: str) -> dict[int, int]:
    consumer = source._require()
    ends = consumer.end_offsets(list(consumer.assignment()))
    return {tp.partition: offset for tp, offset in ends.items() if tp.topic == topic}
