"""Serving replicas that follow the versions topics: one trainer, three replicas, a real broker.

Nothing is shared between the processes but the broker on loopback: each has its own state
directory. The replicas are separate ``dynft serve --follow`` processes answering over HTTP.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kafka import KafkaProducer

from dynft.devbroker import Broker
from dynft.errors import ConfigError
from dynft.registry import AdapterRegistry
from dynft.replication import topics
from dynft.replication.feed import VersionsFeed
from dynft.replication.records import (
    POINTER_KEY,
    PointerRecord,
    VersionRecord,
    encode_pointer,
    encode_version,
    pointer_topic,
    version_key,
)
from dynft.settings import Settings

from helpers import free_port, keyword_events, keyword_text, write_jsonl
from kafka_helpers import reap, stop, wait_until

pytestmark = pytest.mark.slow
LABELS = ["alpha", "beta", "gamma"]
TOKEN = "replica-admin-token"
PROBES = [keyword_text(random.Random(i), LABELS[i % 3]) for i in range(9)]


class Replica:
    """One ``dynft serve --follow`` process with its own state directory and port."""

    def __init__(self, name: str, root: Path, model: Path, follow: str) -> None:
        self.name, self.state_dir, self.model, self.follow = name, root / name, model, follow
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "dynft", "serve", "--follow", self.follow, "--model", str(self.model)]
        cmd += ["--state-dir", str(self.state_dir), "--port", str(self.port), "--set", f"server.admin_token={TOKEN}"]
        # An hour between the watcher's own looks: every flip below comes from the follower's nudge.
        cmd += ["--set", "server.poll_interval_s=3600", "--set", "model.max_length=32"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)

    def get(self, path: str) -> Any:
        return httpx.get(self.url + path, timeout=10).json()

    def loaded(self) -> int | None:
        assert self.proc is not None and self.proc.poll() is None, f"{self.name} exited: {self.log.read_text()[-3000:]}"
        try:
            return self.get("/v1/adapters")["loaded"]  # type: ignore[no-any-return]
        except httpx.HTTPError:
            return None

    def answers(self) -> tuple[int, list[Any]]:
        body = httpx.post(self.url + "/v1/predict", json={"texts": PROBES}, timeout=30).json()
        scores = [(p["label"], {k: round(v, 5) for k, v in p["scores"].items()}) for p in body["predictions"]]
        return body["adapter_version"], scores

    def admin(self, path: str) -> httpx.Response:
        return httpx.post(self.url + path, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


@pytest.fixture
def replicas(tmp_path: Path, tiny_model_dir: Path, kafka_broker: Broker) -> Iterator[tuple[str, list[Replica]]]:
    topic = f"versions-{uuid.uuid4().hex[:8]}"
    follow = f"kafka://{kafka_broker.bootstrap}/{topic}"
    made = [Replica(f"replica{i}", tmp_path, tiny_model_dir, follow) for i in (1, 2, 3)]
    try:
        yield topic, made
    finally:
        for replica in made:
            if replica.proc is not None:
                replica.proc.send_signal(signal.SIGTERM)
        for replica in made:
            if replica.proc is not None:
                reap(replica.proc) if replica.proc.wait(timeout=30) is None else None


def all_serve(replicas: list[Replica], version: int) -> bool:
    return all(r.loaded() == version for r in replicas)


def start_trainer(tmp_path: Path, model: Path, broker: Broker, topic: str) -> subprocess.Popen[bytes]:
    events = write_jsonl(tmp_path / "events.jsonl", keyword_events(480, LABELS, seed=5))
    cmd = [sys.executable, "-m", "dynft", "train", "--model", str(model), "--source", f"file:{events}"]
    cmd += ["--state-dir", str(tmp_path / "trainer")]
    for setting in (
        f"kafka.versions_topic={topic}",
        f"kafka.versions_bootstrap={broker.bootstrap}",
        "registry.publish_every_steps=10",
        "trainer.lr=0.02",
        "trainer.head_lr=0.05",
        "trainer.threads=1",
        "model.max_length=32",
        "gate.min_holdout=8",
        "gate.tolerance=1",
    ):
        cmd += ["--set", setting]
    with open(tmp_path / "trainer.log", "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


def test_three_replicas_follow_the_trainer(
    tmp_path: Path, tiny_model_dir: Path, kafka_broker: Broker, replicas: tuple[str, list[Replica]]
) -> None:
    topic, (r1, r2, r3) = replicas
    r1.start()
    r2.start()
    trainer = start_trainer(tmp_path, tiny_model_dir, kafka_broker, topic)
    trainer_registry = AdapterRegistry(tmp_path / "trainer" / "registry")
    try:
        wait_until(lambda: len(trainer_registry.versions()) >= 4, 300, "four published versions")
        assert stop(trainer) == 0, (tmp_path / "trainer.log").read_text()[-3000:]
    finally:
        reap(trainer)
    pointer = trainer_registry.serving()
    promoted = [pointer.version, *(h["version"] for h in pointer.history)]
    assert pointer.version is not None

    # Every version the trainer promoted reaches the replicas that were running, byte for byte.
    wait_until(lambda: all_serve([r1, r2], pointer.version), 60, f"both replicas to serve v{pointer.version}")
    for replica in (r1, r2):
        mirror = AdapterRegistry(replica.state_dir / "registry")
        for version in promoted:
            assert mirror.meta(version)["content_hash"] == trainer_registry.meta(version)["content_hash"]

    at_current = {r.name: r.answers() for r in (r1, r2)}
    assert at_current["replica1"] == at_current["replica2"]

    # An admin promote on one replica is followed by all; the answers change with the version.
    other = max(v for v in trainer_registry.versions() if v != pointer.version)
    assert r1.admin(f"/v1/adapters/{other}/promote").status_code == 200
    wait_until(lambda: all_serve([r1, r2], other), 30, f"both replicas to serve v{other}")
    at_other = {r.name: r.answers() for r in (r1, r2)}
    assert at_other["replica1"] == at_other["replica2"]
    assert at_other["replica1"] != at_current["replica1"]

    # A rollback sent to another replica is followed by all.
    response = r2.admin("/v1/adapters/rollback")
    assert response.status_code == 200 and response.json()["serving"] == pointer.version, response.text
    wait_until(lambda: all_serve([r1, r2], pointer.version), 30, "both replicas to roll back")
    assert {r.name: r.answers() for r in (r1, r2)} == at_current

    # A replica killed while the version changes, and one started late, come up on the current one.
    assert r1.proc is not None
    r1.proc.kill()
    r1.proc.wait()
    assert r2.admin(f"/v1/adapters/{other}/promote").status_code == 200
    r1.start()
    r3.start()
    wait_until(lambda: all_serve([r1, r2, r3], other), 300, "the restarted and the late replica")
    at_other = {r.name: r.answers() for r in (r1, r2, r3)}
    assert len({json.dumps(a) for a in at_other.values()}) == 1, at_other

    # A tampered adapter (wrong content hash) is refused by every replica, which keep serving.
    tampered = tamper(trainer_registry, other, 999)
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all")
    producer.send(topic, key=version_key(999), value=encode_version(tampered)).get(30)
    decision = {"version": 999, "pinned": True, "reason": "tampered", "updated_at": "9999", "history": []}
    producer.send(pointer_topic(topic), key=POINTER_KEY, value=encode_pointer(PointerRecord(99, "x", decision))).get(30)
    producer.close()
    refused = 'dynft_swap_failures_total{reason="unreadable"}'
    wait_until(lambda: all(r.metric(refused) >= 1 for r in (r1, r2, r3)), 30, "every replica to refuse v999")
    assert {r.name: r.answers() for r in (r1, r2, r3)} == at_other
    for replica in (r1, r2, r3):
        listed = replica.get("/v1/adapters")
        assert listed["serving"] == 999 and listed["loaded"] == other
        refused = {v["version"]: v["refused"] for v in listed["versions"]}
        assert refused[999] == "unreadable" and refused[other] is None, refused
        log = replica.log.read_text(errors="replace")
        assert "ran for" not in log, "kafka-python's slow-task warnings reach the replica's log"


def tamper(registry: AdapterRegistry, version: int, as_version: int) -> VersionRecord:
    """Version ``version``'s files as ``as_version``, one weight byte changed (its hash no longer matches)."""
    files = {p.name: p.read_bytes() for p in registry.path(version).iterdir()}
    meta = json.loads(files["meta.json"])
    files["meta.json"] = json.dumps({**meta, "version": as_version}).encode()
    weights = bytearray(files["adapter_model.safetensors"])
    weights[-1] ^= 0x01
    files["adapter_model.safetensors"] = bytes(weights)
    return VersionRecord(as_version, 99, "tamperer", files)


def test_versions_topics_are_created_compacted_and_checked(kafka_broker: Broker, tiny_settings: Settings) -> None:
    topic = f"versions-{uuid.uuid4().hex[:8]}"
    topics.ensure_topics([kafka_broker.bootstrap], topic, tiny_settings.kafka)
    topics.ensure_topics([kafka_broker.bootstrap], topic, tiny_settings.kafka)  # an existing topic passes the check
    tiny_settings.kafka.versions_max_message_bytes = 64 << 20
    with pytest.raises(ConfigError, match=r"max.message.bytes is 16777216, below kafka.versions_max_message_bytes"):
        topics.ensure_topics([kafka_broker.bootstrap], topic, tiny_settings.kafka)
    plain = f"plain-{uuid.uuid4().hex[:8]}"
    from dynft.produce import ensure_topic

    ensure_topic([kafka_broker.bootstrap], plain, 1, {})
    with pytest.raises(ConfigError, match=r"cleanup.policy is 'delete'; a versions topic must be compacted"):
        topics.ensure_topics([kafka_broker.bootstrap], plain, tiny_settings.kafka)


def test_an_adapter_above_the_record_limit_names_the_setting(kafka_broker: Broker, tiny_settings: Settings) -> None:
    import torch

    from dynft.registry import AdapterState

    registry = AdapterRegistry(tiny_settings.registry_dir)
    big = AdapterState({"w": torch.ones(400_000)}, ["a"], {"peft_type": "LORA"})  # 1.6 MB of weights
    registry.publish(big, {"step": 1})
    tiny_settings.kafka.versions_topic = f"versions-{uuid.uuid4().hex[:8]}"
    tiny_settings.kafka.versions_max_message_bytes = 1 << 20
    feed = VersionsFeed(tiny_settings, registry, [kafka_broker.bootstrap], tiny_settings.kafka.versions_topic)
    try:
        with pytest.raises(ConfigError, match=r"version 1 is \d+ bytes .* above kafka.versions_max_message_bytes"):
            feed.sync()
    finally:
        feed.close()


def small_registry(settings: Settings, versions: int) -> AdapterRegistry:
    import torch

    from dynft.registry import AdapterState

    registry = AdapterRegistry(settings.registry_dir)
    for i in range(versions):
        registry.publish(AdapterState({"w": torch.full((4,), float(i))}, ["a"], {"peft_type": "LORA"}), {"step": i})
    return registry


def test_the_trainer_adopts_a_decision_made_on_a_replica(kafka_broker: Broker, tiny_settings: Settings) -> None:
    from dynft.pointer import now

    registry = small_registry(tiny_settings, 2)
    registry.promote(1, "first")
    registry.promote(2, "second")
    topic = f"versions-{uuid.uuid4().hex[:8]}"
    feed = VersionsFeed(tiny_settings, registry, [kafka_broker.bootstrap], topic)
    feed.start()
    try:
        producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all")
        decision = {"version": 1, "pinned": True, "reason": "rolled back", "updated_at": now(), "history": []}
        record = PointerRecord(feed.epoch, "replica", decision)
        producer.send(pointer_topic(topic), key=POINTER_KEY, value=encode_pointer(record)).get(30)
        producer.close()
        wait_until(lambda: registry.serving().version == 1, 30, "the trainer to adopt the rollback")
        assert registry.serving().pinned  # so its gate does not promote over it
    finally:
        feed.close()


def test_a_malformed_pointer_record_costs_the_trainer_no_decision_after_it(
    kafka_broker: Broker, tiny_settings: Settings
) -> None:
    from dynft.pointer import now

    registry = small_registry(tiny_settings, 2)
    registry.promote(2, "second")
    topic = f"versions-{uuid.uuid4().hex[:8]}"
    feed = VersionsFeed(tiny_settings, registry, [kafka_broker.bootstrap], topic)
    feed.start()
    try:
        producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all", linger_ms=50)
        decision = {"version": 1, "pinned": True, "reason": "rolled back", "updated_at": now(), "history": []}
        record = PointerRecord(feed.epoch, "replica", decision)
        bad = producer.send(pointer_topic(topic), key=POINTER_KEY, value=b"{not a pointer")
        good = producer.send(pointer_topic(topic), key=POINTER_KEY, value=encode_pointer(record))
        bad.get(30), good.get(30)  # one batch (linger): the feed reads them in one poll
        producer.close()
        wait_until(lambda: registry.serving().version == 1, 30, "the trainer to adopt the rollback after it")
    finally:
        feed.close()


def test_a_replica_waits_for_late_versions_and_ignores_stale_trainers(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path
) -> None:
    from prometheus_client import CollectorRegistry

    from dynft.replication.follower import Follower
    from dynft.replication.following import FollowingRegistry

    source = small_registry(tiny_settings, 2)
    topic = f"versions-{uuid.uuid4().hex[:8]}"
    topics.ensure_topics([kafka_broker.bootstrap], topic, tiny_settings.kafka)
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all")

    def send_version(version: int, epoch: int) -> None:
        files = {p.name: p.read_bytes() for p in source.path(version).iterdir()}
        value = encode_version(VersionRecord(version, epoch, "trainer", files))
        producer.send(topic, key=version_key(version), value=value).get(30)

    def send_pointer(version: int, epoch: int) -> None:
        decision = {"version": version, "pinned": False, "reason": f"v{version}", "updated_at": "", "history": []}
        value = encode_pointer(PointerRecord(epoch, "trainer", decision))
        producer.send(pointer_topic(topic), key=POINTER_KEY, value=value).get(30)

    send_pointer(1, epoch=2)  # the pointer arrives before its version
    registry = FollowingRegistry(tmp_path / "replica" / "registry")
    metrics = CollectorRegistry()
    follower = registry.follower = Follower(
        tiny_settings, registry, f"kafka://{kafka_broker.bootstrap}/{topic}", metrics
    )
    follower.start()
    try:
        assert registry.serving().version is None
        send_version(1, epoch=2)
        wait_until(lambda: registry.serving().version == 1, 30, "the pointer to follow its version")
        assert registry.load(1)[1]["content_hash"] == source.meta(1)["content_hash"]
        send_version(2, epoch=1)
        send_pointer(2, epoch=1)  # a stale trainer's decision
        stale = {"kind": "pointer", "outcome": "stale"}
        wait_until(lambda: metrics.get_sample_value("dynft_replica_records_total", stale) == 1, 30, "the stale record")
        assert registry.serving().version == 1
        producer.send(topic, key=version_key(2), value=None).get(30)  # the trainer pruned version 2
        producer.send(topic, key=version_key(1), value=None).get(30)  # ... and 1, which this replica serves
        wait_until(lambda: registry.versions() == [1], 30, "the replica to follow the trainer's retention")
    finally:
        follower.stop()
        producer.close()
