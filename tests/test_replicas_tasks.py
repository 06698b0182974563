"""Every task's versions on the one pair of versions topics, against a real broker.

The trainer's feed carries each task under its own keys; a replica writes each task's versions
into that task's registry (where the engine's lanes find them), and the fencing by epoch holds
for version records as for pointer records. A trainer with an empty registry (a takeover on
another host) starts from what the topics hold.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
from kafka import KafkaProducer
from prometheus_client import CollectorRegistry

from dynft.devbroker import Broker
from dynft.registry import AdapterRegistry, AdapterState
from dynft.replication.feed import VersionsFeed
from dynft.replication.follower import Follower
from dynft.replication.following import FollowingRegistry
from dynft.replication.records import VersionRecord, encode_version, version_key
from dynft.settings import Settings
from dynft.tasks import known_tasks, task_registry_dir

from kafka_helpers import wait_until

pytestmark = pytest.mark.slow


def publish(registry: AdapterRegistry, value: float, promote: bool = True) -> int:
    state = AdapterState({"w": torch.full((4,), value)}, ["a", "b"], {"peft_type": "LORA"})
    version = registry.publish(state, {"step": int(value)}).version
    if promote:
        registry.promote(version, "gate")
    return version


def replica(settings: Settings, root: Path, bootstrap: str, topic: str) -> tuple[Follower, CollectorRegistry]:
    registry, metrics = FollowingRegistry(root), CollectorRegistry()
    follower = registry.follower = Follower(settings, registry, f"kafka://{bootstrap}/{topic}", metrics)
    return follower, metrics


def test_a_replica_serves_every_tasks_versions_from_one_feed(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path
) -> None:
    topic = f"versions-{uuid.uuid4().hex[:8]}"
    default = AdapterRegistry(tmp_path / "trainer")
    spam = AdapterRegistry(task_registry_dir(tmp_path / "trainer", "spam"))
    publish(default, 1.0)
    publish(spam, 10.0)
    publish(spam, 11.0)
    feed = VersionsFeed(tiny_settings, default, [kafka_broker.bootstrap], topic)
    feed.sync()  # its thread starts below, once the replica's decision is to be followed
    spam_feed = feed.lane("spam", spam)  # its first sync sends what the topic lacks
    follower, _ = replica(tiny_settings, tmp_path / "replica", kafka_broker.bootstrap, topic)
    follower.start()
    try:
        root = follower.registry.root
        assert known_tasks(root) == ["default", "spam"]
        replica_spam = AdapterRegistry(task_registry_dir(root, "spam"))
        assert (follower.registry.serving().version, replica_spam.serving().version) == (1, 2)
        assert replica_spam.meta(2)["content_hash"] == spam.meta(2)["content_hash"]
        assert follower.registry.meta(1)["content_hash"] == default.meta(1)["content_hash"]
        publish(spam, 12.0)  # a task's publisher syncs its lane: the replica follows that task only
        spam_feed.sync()
        wait_until(lambda: replica_spam.serving().version == 3, 30, "the replica to serve spam's version 3")
        assert follower.registry.serving().version == 1 and follower.registry.versions() == [1]
        feed._thread.start()  # the trainer follows the pointer topic from here
        assert follower.registry_of("spam").rollback("operator") == 2  # an admin decision for one task
        assert replica_spam.serving().version == 2 and replica_spam.serving().pinned
        wait_until(lambda: spam.serving().version == 2, 30, "the trainer's spam registry to adopt the rollback")
        assert spam.serving().pinned and default.serving().version == 1
    finally:
        follower.stop()
        feed.close()


def test_a_replica_ignores_a_version_record_of_a_stale_epoch(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path
) -> None:
    topic = f"versions-{uuid.uuid4().hex[:8]}"
    trainer = AdapterRegistry(tmp_path / "trainer")
    publish(trainer, 1.0)
    feed = VersionsFeed(tiny_settings, trainer, [kafka_broker.bootstrap], topic, epoch=5)
    feed.start()
    follower, metrics = replica(tiny_settings, tmp_path / "replica", kafka_broker.bootstrap, topic)
    follower.start()
    try:
        files = {p.name: p.read_bytes() for p in trainer.path(1).iterdir()}
        producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
        stale = VersionRecord(9, 4, "trainer-4", files, "spam")  # a trainer that lost its term (epoch 4 < 5)
        producer.send(topic, key=version_key(9, "spam"), value=encode_version(stale)).get(30)
        producer.close()
        labels = {"kind": "version", "outcome": "stale"}
        wait_until(lambda: metrics.get_sample_value("dynft_replica_records_total", labels) == 1, 30, "a stale one")
        assert not task_registry_dir(follower.registry.root, "spam").exists()
    finally:
        follower.stop()
        feed.close()


def test_a_trainer_with_an_empty_registry_starts_from_the_topics_versions(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path
) -> None:
    topic = f"versions-{uuid.uuid4().hex[:8]}"
    first = AdapterRegistry(tmp_path / "first")
    first_spam = AdapterRegistry(task_registry_dir(tmp_path / "first", "spam"))
    publish(first, 1.0)
    publish(first, 2.0, promote=False)
    publish(first_spam, 10.0)
    feed = VersionsFeed(tiny_settings, first, [kafka_broker.bootstrap], topic, epoch=1)
    feed.start()
    feed.lane("spam", first_spam)
    feed.close()
    second = AdapterRegistry(tmp_path / "second")  # another host: nothing on its disk
    takeover = VersionsFeed(tiny_settings, second, [kafka_broker.bootstrap], topic, epoch=2)
    takeover.start()
    try:
        assert second.versions() == [1, 2] and second.serving().version == 1
        assert second.meta(2)["content_hash"] == first.meta(2)["content_hash"]
        second_spam = AdapterRegistry(task_registry_dir(tmp_path / "second", "spam"))
        takeover.lane("spam", second_spam)  # a task's lane opens on its first event
        assert second_spam.versions() == [1] and second_spam.serving().version == 1
    finally:
        takeover.close()
