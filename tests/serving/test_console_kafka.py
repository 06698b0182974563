"""The console's Kafka lag per partition, from a training loop reading a real broker."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from dynft.devbroker import Broker
from dynft.history import CONSOLE_DIR, SNAPSHOT_FILE, read_snapshot
from dynft.loop import TrainingLoop
from dynft.settings import Settings

from helpers import keyword_events
from kafka_helpers import kafka_settings, new_topic, publish, wait_until


@pytest.mark.slow
def test_the_snapshot_shows_the_lag_of_each_partition_until_it_is_drained(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path
) -> None:
    topic = new_topic(kafka_broker, partitions=2)
    publish(kafka_broker, topic, list(keyword_events(800, ["alpha", "beta"], seed=9)), tmp_path)
    settings = kafka_settings(tiny_settings, kafka_broker, topic, "console")
    # Offsets are committed once a version covers them; with a version after every step the tiny
    # model would drain 800 events before the first snapshot shows a lag.
    settings.registry.publish_fresh = False
    # Small batches: four times the steps for the same events, so that a loaded machine, which writes
    # its snapshots late, still writes one between the first lag measurement and the drain.
    settings.trainer.batch_size = 4
    loop = TrainingLoop(settings, CollectorRegistry())
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    path = settings.state_dir / CONSOLE_DIR / SNAPSHOT_FILE
    lags: list[list[tuple[str, int, int]]] = []

    def drained() -> bool:
        snapshot = read_snapshot(path)
        if snapshot is None:
            return False
        lags.append(sorted((p.topic, p.partition, p.lag) for p in snapshot.kafka_lag))
        return lags[-1] == [(topic, 0, 0), (topic, 1, 0)]

    try:
        wait_until(drained, 120, "both partitions in the snapshot, drained")
    finally:
        loop.should_exit.set()
        thread.join(120)
    assert not thread.is_alive()
    # Before it was drained, the snapshot showed records still to be read on some partition.
    assert any(sum(lag for _, _, lag in sample) > 0 for sample in lags if len(sample) == 2), lags
