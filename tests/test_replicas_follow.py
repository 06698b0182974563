"""A replica's follower and the trainer's feed in one process, against a real broker.

Start-up order (the serving version first, the rest in the background), retention compared at
start on both sides, and serving decisions ordered by the pointer topic's offsets.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from kafka import KafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry

from dynft.devbroker import Broker
from dynft.registry import AdapterRegistry, AdapterState
from dynft.replication import topics
from dynft.replication.feed import VersionsFeed
from dynft.replication.follower import Follower
from dynft.replication.following import FollowingRegistry
from dynft.replication.found import read_topics
from dynft.replication.records import PointerLog, PointerRecord, VersionRecord
from dynft.settings import Settings

from kafka_helpers import wait_until

pytestmark = pytest.mark.slow


def small_registry(root: Path, versions: int) -> AdapterRegistry:
    registry = AdapterRegistry(root, keep_last=100)
    for i in range(versions):
        registry.publish(AdapterState({"w": torch.full((4,), float(i))}, ["a"], {"peft_type": "LORA"}), {"step": i})
    return registry


def new_topic() -> str:
    return f"versions-{uuid.uuid4().hex[:8]}"


class GatedFollower(Follower):
    """Writes its backlog only once ``gate`` is set, and records the order it wrote versions in."""

    def __init__(self, settings: Settings, registry: AdapterRegistry, uri: str, metrics: CollectorRegistry) -> None:
        super().__init__(settings, registry, uri, metrics)
        self.gate = threading.Event()
        self.written: list[int] = []

    def _write_backlog(self) -> None:
        if self.gate.wait(0.05):
            super()._write_backlog()

    def _write(self, record: VersionRecord) -> None:
        self.written.append(record.version)
        super()._write(record)


class SlowFollower(Follower):
    """Takes its time writing backlogged versions; ``writing`` is set while one is half-way to disk."""

    def __init__(self, settings: Settings, registry: AdapterRegistry, uri: str, metrics: CollectorRegistry) -> None:
        super().__init__(settings, registry, uri, metrics)
        self.writing = threading.Event()

    def _write(self, record: VersionRecord) -> None:
        if threading.current_thread() is self._thread:
            self.writing.set()
            time.sleep(1.0)
        super()._write(record)


def follower_for(
    settings: Settings, root: Path, bootstrap: str, topic: str, kind: type[Follower] = Follower
) -> tuple[Follower, CollectorRegistry]:
    registry, metrics = FollowingRegistry(root), CollectorRegistry()
    follower = registry.follower = kind(settings, registry, f"kafka://{bootstrap}/{topic}", metrics)
    return follower, metrics


def test_a_replica_writes_the_serving_version_first_and_the_rest_after_it_serves(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path
) -> None:
    trainer = small_registry(tmp_path / "trainer", 6)
    for version in (2, 5, 3):  # serving 3, its history 5 then 2
        trainer.promote(version, f"v{version}")
    topic = new_topic()
    feed = VersionsFeed(tiny_settings, trainer, [kafka_broker.bootstrap], topic)
    feed.sync()
    feed.close()
    stale = small_registry(tmp_path / "replica", 1)  # an earlier run's registry: v1, with other contents
    stale.publish(AdapterState({"w": torch.zeros(4)}, ["a"], {"peft_type": "LORA"}), {"step": 0})  # and v2
    follower, _ = follower_for(tiny_settings, tmp_path / "replica", kafka_broker.bootstrap, topic, GatedFollower)
    assert isinstance(follower, GatedFollower)
    follower.start()
    try:
        replica = follower.registry
        assert replica.serving().version == 3
        assert replica.load(3)[1]["content_hash"] == trainer.meta(3)["content_hash"]
        assert follower.written == [3] and replica.versions() == [1, 2, 3]  # the rest waits (1, 2: an old run's)
        follower.gate.set()
        wait_until(lambda: len(follower.written) == 6, 30, "the backlog to be written")
        assert follower.written == [3, 5, 2, 6, 4, 1]  # the serving history first, then newest first
        assert replica.versions() == [1, 2, 3, 4, 5, 6]
        for version in range(1, 7):
            assert replica.meta(version)["content_hash"] == trainer.meta(version)["content_hash"]
    finally:
        follower.stop()


def published(
    settings: Settings, root: Path, count: int, bootstrap: str, history: tuple[int, ...] = ()
) -> tuple[AdapterRegistry, str]:
    """A registry of ``count`` versions serving the newest (after ``history``), synced once to a new topic."""
    trainer = small_registry(root, count)
    for version in [*history, count]:
        trainer.promote(version, f"v{version}")
    topic = new_topic()
    feed = VersionsFeed(settings, trainer, [bootstrap], topic)
    feed.sync()
    feed.close()
    return trainer, topic


def test_a_replica_removes_versions_the_topic_no_longer_holds(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path
) -> None:
    _, topic = published(tiny_settings, tmp_path / "trainer", 2, kafka_broker.bootstrap)
    leftover = small_registry(tmp_path / "replica", 4)  # versions 3 and 4 were pruned while it was down
    leftover.discard(1)
    follower, _ = follower_for(tiny_settings, tmp_path / "replica", kafka_broker.bootstrap, topic)
    follower.start()
    try:
        wait_until(lambda: follower.registry.versions() == [1, 2], 30, "versions 3 and 4 to leave the replica")
    finally:
        follower.stop()


def versions_topic_records(bootstrap: str, topic: str) -> list[tuple[str, bool]]:
    """(key, is a tombstone) of every record on the versions topic, in order."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    end = consumer.end_offsets([tp])[tp]
    out: list[tuple[str, bool]] = []
    while consumer.position(tp) < end:
        for record in consumer.poll(timeout_ms=500).get(tp, []):
            out.append((record.key.decode(), record.value is None))
    consumer.close()
    return out


def test_a_trainer_tombstones_versions_pruned_while_it_was_down(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path
) -> None:
    trainer, topic = published(tiny_settings, tmp_path / "trainer", 4, kafka_broker.bootstrap)
    trainer.discard(1)  # pruned while no feed ran
    trainer.discard(2)
    feed = VersionsFeed(tiny_settings, trainer, [kafka_broker.bootstrap], topic)
    feed.sync()
    feed.close()
    records = versions_topic_records(kafka_broker.bootstrap, topic)
    sent = [f"version/{v:06d}" for v in (1, 2, 3, 4)]
    # Versions 3 and 4 are on the topic already and are not sent again; 1 and 2 get a tombstone.
    assert records == [(k, False) for k in sent] + [(sent[0], True), (sent[1], True)]
    consumer = topics.consumer([kafka_broker.bootstrap], tiny_settings.kafka)
    assert sorted(read_topics(consumer, topic).versions) == [("default", 3), ("default", 4)]
    consumer.close()


def test_a_trainer_promotion_that_had_not_seen_a_replicas_rollback_is_void(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path
) -> None:
    trainer = small_registry(tmp_path / "trainer", 3)
    trainer.promote(1, "v1")
    trainer.promote(2, "v2")
    topic = new_topic()
    feed = VersionsFeed(tiny_settings, trainer, [kafka_broker.bootstrap], topic)
    feed.sync()  # the feed's thread is not running yet: the trainer has not read what follows
    follower, metrics = follower_for(tiny_settings, tmp_path / "replica", kafka_broker.bootstrap, topic)
    follower.start()
    try:
        replica = follower.registry
        assert replica.serving().version == 2
        assert replica.rollback("operator") == 1  # returns once this replica applied it
        trainer.promote(3, "gate")  # decided before the trainer read the rollback
        feed.sync()
        void = {"kind": "pointer", "outcome": "void"}
        wait_until(lambda: metrics.get_sample_value("dynft_replica_records_total", void) == 1, 30, "the void one")
        assert replica.serving().version == 1 and replica.serving().pinned
        feed._thread.start()  # now the trainer reads the topic: it adopts the rollback (and its pin)
        wait_until(lambda: trainer.serving().version == 1, 30, "the trainer to adopt the rollback")
        assert trainer.serving().pinned
    finally:
        follower.stop()
        feed.close()


def test_a_rollback_waits_for_a_version_the_background_is_still_writing(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path
) -> None:
    _, topic = published(tiny_settings, tmp_path / "trainer", 2, kafka_broker.bootstrap, history=(1,))
    follower, _ = follower_for(tiny_settings, tmp_path / "replica", kafka_broker.bootstrap, topic, SlowFollower)
    assert isinstance(follower, SlowFollower)
    follower.start()
    try:
        replica = follower.registry
        assert follower.writing.wait(10) and 1 not in replica.versions()  # v1 is half-way to disk
        assert replica.rollback("operator") == 1
        assert replica.serving().version == 1 and replica.versions() == [1, 2]
    finally:
        follower.stop()


def test_the_pointer_log_orders_decisions_by_offset_not_clocks() -> None:
    log = PointerLog()
    assert log.admit(PointerRecord(2, "trainer-2", {"version": 5, "pinned": False}, seen=-1), 0) == "applied"
    assert log.admit(PointerRecord(2, "replica", {"version": 4, "pinned": True}, seen=0), 1) == "applied"
    assert log.admit(PointerRecord(2, "trainer-2", {"version": 6, "pinned": False}, seen=0), 2) == "void"
    assert log.admit(PointerRecord(1, "trainer-1", {"version": 7, "pinned": True}, seen=2), 3) == "stale"
    assert log.admit(PointerRecord(2, "replica", {"version": 4, "pinned": False}, seen=3), 4) == "applied"  # unpin
    assert log.admit(PointerRecord(2, "trainer-2", {"version": 6, "pinned": False}, seen=4), 5) == "applied"
    assert (log.seen, log.pin_offset(), log.epoch) == (5, 1, 2)


def test_kafka_slow_task_warnings_are_dropped_and_other_warnings_kept(caplog: pytest.LogCaptureFixture) -> None:
    topics.quiet_slow_task_warnings()
    selector = logging.getLogger("kafka.net.selector")
    with caplog.at_level(logging.WARNING, logger="kafka.net.selector"):
        selector.warning("Task %r ran for %.3fs (>%.3fs threshold). It is blocking the event loop", "t", 0.24, 0.1)
        selector.warning("Task %s left RUNNING after step; demoting to UNSCHEDULED", "t")
    assert [r.getMessage() for r in caplog.records] == ["Task t left RUNNING after step; demoting to UNSCHEDULED"]
