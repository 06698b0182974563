"""The console's Kafka lag per partition, from a training loop reading a real broker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
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
    """Records produced while the loop runs show as lag on their partitions until a checkpoint
    commits them, then the lag is 0 again.

    Timed from a checkpoint, not from the start: the first records are drained first (under a
    loaded machine the group's first join can outlast a checkpoint interval, so their commit can
    come right after they are trained, before any lag query), then more are produced just after
    that drain's checkpoint, and the next checkpoint is 8 s away (``checkpoint.interval_s``),
    while the lag is queried every second and the snapshot written five times a second."""
    topic = new_topic(kafka_broker, partitions=2)
    events = list(keyword_events(1200, ["alpha", "beta"], seed=9))
    publish(kafka_broker, topic, events[:800], tmp_path)
    settings = kafka_settings(tiny_settings, kafka_broker, topic, "console")
    settings.registry.publish_fresh = False  # offsets wait for a version too: one every 20 steps
    settings.checkpoint.interval_s = 8.0
    settings.checkpoint.every_steps = 10_000
    settings.kafka.lag_interval_s = 1.0
    settings.run.status_interval_s = 0.2
    loop = TrainingLoop(settings, CollectorRegistry())
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    path = settings.state_dir / CONSOLE_DIR / SNAPSHOT_FILE
    lags: list[list[tuple[str, int, int]]] = []

    def lag_now() -> list[tuple[str, int, int]] | None:
        snapshot = read_snapshot(path)
        if snapshot is None:
            return None
        lags.append(sorted((p.topic, p.partition, p.lag) for p in snapshot.kafka_lag))
        return lags[-1]

    def wait_for(what: str, condition: Callable[[list[tuple[str, int, int]]], bool]) -> None:
        deadline = time.monotonic() + 120
        while (lag := lag_now()) is None or not condition(lag):
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {lags[-3:]}"
            time.sleep(0.1)

    def drained(lag: list[tuple[str, int, int]]) -> bool:
        return lag == [(topic, 0, 0), (topic, 1, 0)]

    try:
        wait_for("both partitions drained", drained)
        lags.clear()
        publish(kafka_broker, topic, events[800:], tmp_path)
        # The records still to be committed show on both partitions, 400 in all at first.
        wait_for("the new records' lag", lambda lag: len(lag) == 2 and sum(n for *_, n in lag) > 0)
        assert max(sum(n for *_, n in lag) for lag in lags if len(lag) == 2) <= 400
        wait_for("both partitions drained again", drained)
    finally:
        loop.should_exit.set()
        thread.join(120)
    assert not thread.is_alive()
