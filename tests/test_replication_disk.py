"""A replica's (or the trainer's) registry that refuses writes for a while loses no version and no
serving decision from the versions topics: once it is writable again, what arrived meanwhile is
written, with nothing more on the topics. The registry is made read-only for real (a read-only
bind mount over it); the broker is real.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from kafka import KafkaProducer
from prometheus_client import CollectorRegistry

from dynft.devbroker import Broker
from dynft.pointer import now
from dynft.registry import AdapterRegistry, AdapterState
from dynft.replication.feed import VersionsFeed
from dynft.replication.follower import Follower
from dynft.replication.following import FollowingRegistry
from dynft.replication.records import POINTER_KEY, PointerRecord, encode_pointer, pointer_topic
from dynft.settings import Settings

from kafka_helpers import wait_until
from test_state_faults import _mount, mounted

pytestmark = pytest.mark.slow


@contextmanager
def read_only(root: Path) -> Iterator[None]:
    """``root`` read-only until the block ends (or the test is skipped where mounting is refused)."""
    with mounted(root, "--bind", str(root)) as target:
        if _mount("-o", "remount,ro,bind", str(target)).returncode != 0:
            pytest.skip("cannot remount the bind mount read-only here")
        try:
            yield
        finally:
            _mount("-o", "remount,rw,bind", str(target))


def publish(registry: AdapterRegistry, value: float) -> int:
    state = AdapterState({"w": torch.full((4,), value)}, ["a"], {"peft_type": "LORA"})
    return registry.publish(state, {"step": int(value)}).version


def test_a_replica_whose_registry_refuses_writes_writes_what_came_meanwhile_once_it_can(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer = AdapterRegistry(tmp_path / "trainer")
    trainer.promote(publish(trainer, 1.0), "v1")
    topic = f"versions-{uuid.uuid4().hex[:8]}"
    feed = VersionsFeed(tiny_settings, trainer, [kafka_broker.bootstrap], topic)
    feed.start()
    replica = FollowingRegistry(tmp_path / "replica")
    uri = f"kafka://{kafka_broker.bootstrap}/{topic}"
    follower = replica.follower = Follower(tiny_settings, replica, uri, CollectorRegistry())
    caplog.set_level(logging.INFO, logger="dynft.replication.follower")
    follower.start()
    try:
        assert replica.serving().version == 1
        with read_only(tmp_path / "replica"):
            for value in (2.0, 3.0):
                trainer.promote(publish(trainer, value), f"v{int(value)}")
                feed.sync()
            said = lambda: [r.getMessage() for r in caplog.records if "not written" in r.getMessage()]  # noqa: E731
            wait_until(lambda: len(said()) > 0, 30, "the replica to meet the read-only registry")
            assert replica.versions() == [1] and replica.serving().version == 1
        wait_until(lambda: replica.serving().version == 3, 30, "the decision once the registry is writable")
        # Version 3 can be written (and its pointer installed) a round before version 2, whose write
        # met the remount: each is tried again until written (seen once in a full run).
        wait_until(lambda: replica.versions() == [1, 2, 3], 30, "every version once the registry is writable")
        for version in (2, 3):
            assert replica.meta(version)["content_hash"] == trainer.meta(version)["content_hash"]
        assert len(said()) == 1, said()  # said once, however often it was tried
        assert any("writable again" in r.getMessage() for r in caplog.records)
    finally:
        follower.stop()
        feed.close()


def test_a_trainer_whose_registry_refuses_writes_adopts_a_replicas_rollback_once_it_can(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer = AdapterRegistry(tmp_path / "trainer")
    for value in (1.0, 2.0):
        trainer.promote(publish(trainer, value), f"v{int(value)}")
    topic = f"versions-{uuid.uuid4().hex[:8]}"
    feed = VersionsFeed(tiny_settings, trainer, [kafka_broker.bootstrap], topic)
    feed.start()
    try:
        with caplog.at_level(logging.INFO, logger="dynft.replication.feed"), read_only(tmp_path / "trainer"):
            decision = {"version": 1, "pinned": True, "reason": "rolled back", "updated_at": now(), "history": []}
            producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all")
            record = PointerRecord(feed.epoch, "replica", decision)
            producer.send(pointer_topic(topic), key=POINTER_KEY, value=encode_pointer(record)).get(30)
            producer.close()
            met = lambda: any("not adopted" in r.getMessage() for r in caplog.records)  # noqa: E731
            wait_until(met, 30, "the feed to meet the read-only registry")
            assert trainer.serving().version == 2
        wait_until(lambda: trainer.serving().version == 1, 30, "the rollback once the registry is writable")
        assert trainer.serving().pinned  # so the gate does not promote over it
    finally:
        feed.close()


def test_writes_that_fail_and_succeed_in_turn_are_said_once_a_minute(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a probe: on a nearly full disk a version written after a tombstone freed room, then
    serving.json failed, in turn: 66 errors and 65 "writable again" lines in 40 s. A failure that
    then lasts is still said. The follower's two methods are called as its thread calls them, on a
    clock the test moves (a disk that fills and frees at will cannot be made here)."""
    from types import SimpleNamespace

    from dynft.errors import RegistryWriteError
    from dynft.replication import follower as module

    clock = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: clock[0])
    follower = SimpleNamespace(_failing=False, _failure_said=False, _failure_said_at=-float("inf"))

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records]

    def fail() -> None:
        Follower._failed(follower, "task default's serving pointer", RegistryWriteError("no space"))  # type: ignore[arg-type]

    with caplog.at_level(logging.INFO, logger="dynft.replication.follower"):
        for _ in range(30):  # in turn, within a second
            fail()
            Follower._wrote(follower)  # type: ignore[arg-type]
            clock[0] += 0.03
        assert sum("not written" in m for m in said()) == 1 and sum("writable again" in m for m in said()) == 1
        for _ in range(5):  # then failing for good, a try every 30 s
            clock[0] += 30
            fail()
        assert sum("not written" in m for m in said()) == 2  # said again once a minute had passed
        Follower._wrote(follower)  # type: ignore[arg-type]
    assert sum("writable again" in m for m in said()) == 2, said()
