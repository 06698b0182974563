"""Records queued in the intake across a rebalance, against the real broker.

kafka-python 3.0 (eager protocol) tells the listener that every partition is revoked when a
rebalance starts, but a partition the member gets back keeps its fetch position. Queued
records of such a partition must therefore stay queued: dropping them would skip them for
good, since nobody fetches them again. Queued records of a partition that went to another
member are dropped, and that member reads them again from the committed offset.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from kafka import KafkaConsumer
from prometheus_client import CollectorRegistry

from dynft.devbroker import Broker
from dynft.metrics import KafkaMetrics
from dynft.settings import KafkaSettings
from dynft.sources.base import Intake
from dynft.sources.kafka import KafkaSource

from kafka_helpers import new_topic, publish, wait_until


def rows(prefix: str, n: int) -> list[dict[str, str]]:
    return [{"id": f"{prefix}{i}", "text": f"w{i}", "label": "a"} for i in range(n)]


def test_a_partition_given_back_after_a_rebalance_keeps_its_queued_records(
    kafka_broker: Broker, tmp_path: Path
) -> None:
    topic, other = new_topic(kafka_broker, partitions=1), new_topic(kafka_broker, partitions=1)
    first, later = rows("q", 300), rows("l", 50)
    publish(kafka_broker, topic, first, tmp_path)
    metrics = KafkaMetrics(CollectorRegistry())
    settings = KafkaSettings(session_timeout_ms=6000, lag_interval_s=0.5)
    source = KafkaSource(f"kafka://{kafka_broker.bootstrap}/{topic}?group=back", settings, metrics)
    intake = Intake(source, max_queued=1000)
    intake.start()
    joiner = None
    try:
        wait_until(lambda: intake.queued == len(first), 60, "the first records to be queued")
        rebalances = metrics.rebalances._value.get()
        # A member subscribed to another topic joins the group: everyone rejoins, and the
        # range assignor hands this member its only partition back.
        joiner = KafkaConsumer(other, bootstrap_servers=kafka_broker.bootstrap, group_id="back")
        deadline = time.monotonic() + 60
        while not joiner.assignment() and time.monotonic() < deadline:
            joiner.poll(timeout_ms=200)
        assert joiner.assignment(), "the second member never joined"
        wait_until(lambda: metrics.rebalances._value.get() > rebalances, 60, "the rebalance to reach the source")
        wait_until(lambda: source._revoked_at is None, 60, "the partition to come back")
        publish(kafka_broker, topic, later, tmp_path)
        taken: list[str] = []
        deadline = time.monotonic() + 60
        while len(set(taken)) < len(first) + len(later) and time.monotonic() < deadline:
            taken += [json.loads(r.raw)["id"] for r in intake.take(100, 0.5)]
            joiner.poll(timeout_ms=0)  # keep the other member alive
        missing = {r["id"] for r in first + later} - set(taken)
        assert not missing, f"{len(missing)} record(s) never delivered, e.g. {sorted(missing)[:5]}"
    finally:
        if joiner is not None:
            joiner.close(autocommit=False)
        intake.stop()
