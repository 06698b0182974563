"""A versions-topic sync that fails is tried again from the loop's tick, not only at the next publish.

A sharded trainer's term is suspended while its group rebalances; versions published meanwhile are
withheld. When the stream ended during the suspension, no publish came after it, and the replicas
never got those versions (seen in ``test_sharding``). The election's rebalances suspend terms at
moments a test cannot choose, so here the term is a stand-in the test suspends and resumes; the
broker and the topics are real.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from dynft.devbroker import Broker
from dynft.evaluation import HoldoutWindow
from dynft.events import DEFAULT_TASK, Event
from dynft.loop import TrainingLoop
from dynft.metrics import TrainerMetrics
from dynft.publisher import Publisher
from dynft.registry import AdapterRegistry, AdapterState
from dynft.replication.feed import RETRY_FIRST_S, VersionsFeed
from dynft.replication.records import decode_pointer, parse_version_key, pointer_topic
from dynft.settings import Settings
from dynft.trainer import OnlineTrainer

from helpers import keyword_events, write_jsonl
from kafka_helpers import topic_records, wait_until

pytestmark = pytest.mark.slow


class SwitchedTerm:
    """A term held or suspended as the test says (``replication.feed.Term``)."""

    epoch = 3

    def __init__(self) -> None:
        self.holding = True

    def held(self, task: str = DEFAULT_TASK) -> bool:
        return self.holding

    def shard(self, task: str) -> int:
        return 0


def versions_on(bootstrap: str, topic: str) -> list[int]:
    keys = [parse_version_key(r.key) for r in topic_records(bootstrap, topic) if r.value is not None]
    return sorted(k[1] for k in keys if k is not None)


def pointers_on(bootstrap: str, topic: str) -> list[int]:
    return [decode_pointer(r.value).pointer["version"] for r in topic_records(bootstrap, pointer_topic(topic))]


def publish_one(registry: AdapterRegistry, value: float) -> int:
    import torch

    state = AdapterState({"w": torch.full((4,), value)}, ["a"], {"peft_type": "LORA"})
    return registry.publish(state, {"step": int(value)}).version


@contextmanager
def hand_writing(
    broker: Broker, settings: Settings, caplog: pytest.LogCaptureFixture
) -> Iterator[tuple[AdapterRegistry, str, Any]]:
    """A started feed of a registry serving version 1, a producer to write its topics by hand, and
    the feed's errors captured: (registry, versions topic, producer)."""
    from kafka import KafkaProducer

    registry = AdapterRegistry(settings.registry_dir)
    registry.promote(publish_one(registry, 1.0), "first")
    topic = f"versions-{uuid.uuid4().hex[:8]}"
    feed = VersionsFeed(settings, registry, [broker.bootstrap], topic, term=SwitchedTerm())
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    try:
        with caplog.at_level(logging.ERROR, logger="dynft.replication.feed"):
            feed.start()
            yield registry, topic, producer
    finally:
        producer.close()
        feed.close()


def test_a_sync_withheld_by_a_suspended_term_is_tried_again_with_backoff_and_sent_once_held(
    kafka_broker: Broker, tiny_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    registry = AdapterRegistry(tiny_settings.registry_dir)
    registry.promote(publish_one(registry, 1.0), "first")
    topic, term = f"versions-{uuid.uuid4().hex[:8]}", SwitchedTerm()
    feed = VersionsFeed(tiny_settings, registry, [kafka_broker.bootstrap], topic, term=term)
    feed.start()
    try:
        assert versions_on(kafka_broker.bootstrap, topic) == [1] and not feed.due()
        term.holding = False  # a rebalance began
        registry.promote(publish_one(registry, 2.0), "second")
        with caplog.at_level(logging.INFO, logger="dynft.replication.feed"):
            failed = time.monotonic()
            feed.sync()  # the publisher's hook
            assert not feed.sent(2) and not feed.due()
            wait_until(feed.due, 10 * RETRY_FIRST_S, "the first try")  # the loop's tick syncs then
            assert time.monotonic() - failed >= RETRY_FIRST_S
            failed = time.monotonic()
            feed.sync()  # still suspended: the next try waits twice as long
            feed.sync()  # another publish during the suspension: still withheld, said once
            assert not feed.due()
            term.holding = True  # the same partitions came back
            wait_until(feed.due, 10 * RETRY_FIRST_S, "the next try")
            assert time.monotonic() - failed >= 2 * RETRY_FIRST_S
            feed.sync()
        assert feed.sent(2) and not feed.due()
        assert versions_on(kafka_broker.bootstrap, topic) == [1, 2]
        assert pointers_on(kafka_broker.bootstrap, topic)[-1] == 2
        said = [r.getMessage() for r in caplog.records]
        assert sum("versions topic not updated" in m for m in said) == 1, said
        assert sum("up to date again after 3 failed sync(s)" in m for m in said) == 1, said
    finally:
        feed.close()


def test_the_loop_tick_puts_a_withheld_version_on_the_topic_and_the_publisher_counts_it_sent(
    kafka_broker: Broker, tiny_settings: Settings, tiny_trainer: OnlineTrainer
) -> None:
    topic, term = f"versions-{uuid.uuid4().hex[:8]}", SwitchedTerm()
    registry = AdapterRegistry(tiny_settings.registry_dir)
    publisher = Publisher(registry, tiny_trainer, HoldoutWindow(64), tiny_settings, TrainerMetrics(CollectorRegistry()))
    feed = publisher.feed = VersionsFeed(tiny_settings, registry, [kafka_broker.bootstrap], topic, term=term)
    try:
        batch = [Event(**r) for r in keyword_events(16, ["alpha", "beta"], seed=3)]  # type: ignore[arg-type]
        tiny_trainer.step(tiny_trainer.collator(batch, n_fresh=len(batch)))
        term.holding = False
        version = publisher.maybe_publish({}, force=True)
        assert version == 1 and not publisher.on_topic  # the trained steps are in no version on the topic
        term.holding = True
        assert not publisher.resync()  # held again, but the retry is not due yet: nothing is tried
        assert versions_on(kafka_broker.bootstrap, topic) == []
        wait_until(lambda: publisher.resync() and publisher.on_topic, 10 * RETRY_FIRST_S, "the tick's sync")
        assert versions_on(kafka_broker.bootstrap, topic) == [1]
        assert not publisher.resync()  # up to date: nothing more to try
    finally:
        feed.close()


def settle(loop: TrainingLoop, quiet_s: float = 3.0) -> None:
    """Wait until the loop's steps and versions stay the same for ``quiet_s``: the stream is trained."""
    seen = None
    for _ in range(40):
        now = (loop.trainer.steps, loop.publisher.latest_version)
        if now == seen:
            return
        seen = now
        time.sleep(quiet_s)
    raise AssertionError(f"the loop never went quiet: {seen}")


def test_a_running_loop_sends_what_a_suspension_withheld_after_its_stream_went_quiet(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path
) -> None:
    """The loop's tick does it: no version is published after the term comes back."""
    tiny_settings.kafka.versions_topic = topic = f"versions-{uuid.uuid4().hex[:8]}"
    tiny_settings.kafka.versions_bootstrap = kafka_broker.bootstrap
    path = tmp_path / "events.jsonl"
    path.write_text("")
    tiny_settings.source.uri = f"file:{path}"
    tiny_settings.source.follow = True  # the events come once the term is suspended; the loop ticks on after them
    loop = TrainingLoop(tiny_settings)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        wait_until(loop.started.is_set, 120, "the loop to start")
        feed = loop.publisher.feed
        assert isinstance(feed, VersionsFeed)
        holding = [False]
        feed.held = lambda task: holding[0]  # the term, suspended by a rebalance the test cannot time
        write_jsonl(path, keyword_events(48, ["alpha", "beta"], seed=4))
        wait_until(lambda: loop.publisher.latest_version is not None, 120, "a version while suspended")
        settle(loop)
        assert versions_on(kafka_broker.bootstrap, topic) == []
        holding[0] = True
        newest = loop.publisher.latest_version
        wait_until(lambda: loop.publisher.on_topic, 60, "the withheld versions")  # set once the sync returned
        assert newest in versions_on(kafka_broker.bootstrap, topic)
        assert loop.publisher.latest_version == newest  # sent by the tick, not by a publish
    finally:
        loop.should_exit.set()
        thread.join(timeout=60)


def test_a_decision_of_a_newer_epoch_on_the_pointer_topic_is_said_loudly_by_the_fenced_trainer(
    kafka_broker: Broker, tiny_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by a probe: a pointer record of epoch 999 written by hand made every replica ignore the
    running trainer's versions, while the trainer said so only at INFO ("a stale serving decision
    ... is ignored", about its own next records) and went on publishing what nobody served."""
    from dynft.replication.records import PointerRecord, encode_pointer, pointer_key

    with hand_writing(kafka_broker, tiny_settings, caplog) as (_registry, topic, producer):
        # A newer epoch on a task this trainer does not publish (another sharded trainer's) is no fence.
        other = PointerRecord(998, "elsewhere", {"version": 1, "pinned": False}, seen=10**6, task="other")
        producer.send(pointer_topic(topic), key=pointer_key("other"), value=encode_pointer(other)).get(30)
        forged = PointerRecord(999, "by-hand", {"version": 1, "pinned": False}, seen=10**6)
        for _ in range(3):  # said once for its epoch, not once per record
            producer.send(pointer_topic(topic), key=pointer_key(), value=encode_pointer(forged)).get(30)
        said = lambda: [r.getMessage() for r in caplog.records if "newer than this trainer's" in r.getMessage()]  # noqa: E731
        wait_until(lambda: bool(said()), 30, "the fenced trainer's error")
        time.sleep(2)
    assert len(said()) == 1 and "trainer epoch 999 (by-hand" in said()[0] and "trainer's 3" in said()[0], said()


def test_two_trainers_of_one_epoch_do_not_adopt_each_others_decisions_and_say_so(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by a probe: two trainers started together without kafka.election both took epoch 1
    and wrote as "trainer-1"; each adopted the other's promotions as an operator's, and replicas
    flipped between two models under one version sequence, with no warning anywhere."""
    from dynft.replication.records import PointerRecord, encode_pointer, pointer_key

    with hand_writing(kafka_broker, tiny_settings, caplog) as (registry, topic, producer):
        twin = PointerRecord(SwitchedTerm.epoch, "trainer-3-otherhost-77", {"version": 1, "pinned": True}, 10**6)
        for _ in range(2):
            producer.send(pointer_topic(topic), key=pointer_key(), value=encode_pointer(twin)).get(30)
        said = lambda: [r.getMessage() for r in caplog.records if "another trainer" in r.getMessage()]  # noqa: E731
        wait_until(lambda: bool(said()), 30, "the twin's error")
        time.sleep(2)
    assert len(said()) == 1 and "trainer-3-otherhost-77" in said()[0] and "kafka.election" in said()[0]
    assert not registry.serving().pinned  # its decision was not taken for an operator's
