"""The console's Kafka lag per partition, from a training loop reading a real broker."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from dynft.devbroker import Broker
from dynft.history import CONSOLE_DIR, SNAPSHOT_FILE, read_snapshot
from dynft.loop import TrainingLoop
from dynft.settings import Settings

from helpers import keyword_events
from kafka_helpers import kafka_settings, new_topic, publish


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
    # No offset is committed before a checkpoint: none for the first 8 s, so the lag (measured
    # every second, each query given a second) is there to be seen however fast the tiny model
    # trains. In fresh-clone runs of the whole suite on the loaded 2-core machine, a checkpoint
    # a second (the helper's) and a lag query given 0.5 s showed no lag before the drain.
    settings.checkpoint.interval_s = 8.0
    settings.checkpoint.every_steps = 10_000
    settings.kafka.lag_interval_s = 1.0
    settings.run.status_interval_s = 0.2  # snapshots five times a second, read ten times
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
        deadline = time.monotonic() + 120
        while not drained():
            assert time.monotonic() < deadline, "timed out waiting for both partitions in the snapshot, drained"
            time.sleep(0.1)
    finally:
        loop.should_exit.set()
        thread.join(120)
    assert not thread.is_alive()
    # Before it was drained, the snapshot showed records still to be read on some partition.
    assert any(sum(lag for _, _, lag in sample) > 0 for sample in lags if len(sample) == 2), repr(lags)[-2000:]
