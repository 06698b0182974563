"""A serving replica's side: follow the versions topics into a registry of its own.

``Follower`` reads both compacted topics into the replica's own registry directory (in its own
state directory): each version record is written as the version directory its publisher
wrote, each pointer record replaces ``serving.json``. The inference engine's watcher then
loads, checks (content hash, base-model fingerprint, tensor shapes) and flips exactly as on
the trainer's host; a version that fails is refused, counted (``dynft_swap_failures_total``)
and never installed, and the replica keeps serving what it served.

At start ``catch_up`` reads both topics to their current end before the server answers; then
the follower's thread (the only user of its consumer) keeps reading. Retention follows the
trainer's: a version the trainer prunes is a tombstone on the topic, and leaves the replica too. A pointer record whose
version has not arrived yet waits for it; one with an older epoch than the newest seen comes
from a stale trainer and is ignored. ``FollowingRegistry`` sends the admin API's promote /
rollback / unpin to the pointer topic instead of writing ``serving.json``, and returns once the
follower has applied the decision, so every replica (and the trainer) follows it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from dynft.errors import RegistryError, RegistryWriteError, ReplicationError
from dynft.fingerprint import BaseModelId
from dynft.registry import AdapterRegistry, ServingPointer, check_base_model, now, rollback_target
from dynft.replication import topics
from dynft.replication.records import POINTER_KEY, PointerRecord, decode_pointer, decode_version, encode_pointer
from dynft.replication.records import pointer_topic as pointer_topic_of
from dynft.settings import Settings
from dynft.sources.kafka import parse_kafka_uri

log = logging.getLogger(__name__)
APPLY_TIMEOUT_S = 10.0


def parse_follow_uri(uri: str) -> tuple[list[str], str]:
    """``kafka://HOST:PORT[,HOST:PORT]/TOPIC`` -> (brokers, versions topic)."""
    servers, names, _ = parse_kafka_uri(uri, "unused")
    if len(names) != 1:
        raise ReplicationError(f"--follow {uri!r}: name exactly one versions topic")
    return servers, names[0]


class ReplicaMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.records = Counter(
            "dynft_replica_records",
            "Records read from the versions topics, by kind and outcome",
            ["kind", "outcome"],
            registry=registry,
        )
        self.epoch = Gauge("dynft_replica_trainer_epoch", "Newest trainer epoch seen on the topics", registry=registry)
        for kind in ("version", "pointer"):
            for outcome in ("applied", "duplicate", "stale", "malformed"):
                self.records.labels(kind, outcome)


class Follower:
    def __init__(
        self, settings: Settings, registry: AdapterRegistry, uri: str, metrics_registry: CollectorRegistry
    ) -> None:
        self.settings, self.registry = settings, registry
        self.servers, self.topic = parse_follow_uri(uri)
        self.pointer_topic = pointer_topic_of(self.topic)
        self.metrics = ReplicaMetrics(metrics_registry)
        self.epoch = 0  # newest trainer epoch seen
        self._pending: PointerRecord | None = None  # a pointer whose version has not arrived yet
        self._catching_up = False
        self._applied = threading.Condition()
        self._applied_offset = -1  # pointer topic: offset of the last record handled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="dynft-follow", daemon=True)
        self._consumer: Any = None
        self._producer: Any = None

    def start(self) -> None:
        """Read both topics to their end (the current version is then in the registry), then follow."""
        from kafka import TopicPartition

        topics.ensure_topics(self.servers, self.topic, self.settings.kafka)
        self._consumer = topics.consumer(self.servers, self.settings.kafka)
        self._producer = topics.producer(self.servers, self.settings.kafka)
        parts = [TopicPartition(self.topic, 0), TopicPartition(self.pointer_topic, 0)]
        self._consumer.assign(parts)
        self._consumer.seek_to_beginning(*parts)
        ends = self._consumer.end_offsets(parts)
        started = time.monotonic()
        self._catching_up = True  # only the newest pointer matters until the end is reached
        while any(self._consumer.position(tp) < ends[tp] for tp in parts):
            self._poll()
        self._catching_up = False
        if self._pending is not None and self._pending.pointer.get("version") in self.registry.versions():
            self._install(self._pending)
        log.info(
            "read %s to its end in %.1f s: serving version %s",
            self.topic,
            time.monotonic() - started,
            self.registry.serving().version,
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        for client in (self._consumer, self._producer):
            if client is not None:
                client.close()

    def send_pointer(self, pointer: ServingPointer) -> None:
        """Publish a serving decision made here; returns once this replica has applied it."""
        from kafka.errors import KafkaError

        record = PointerRecord(self.epoch, "replica", dict(pointer.__dict__))
        try:
            meta = self._producer.send(self.pointer_topic, key=POINTER_KEY, value=encode_pointer(record)).get(
                timeout=APPLY_TIMEOUT_S
            )
        except KafkaError as exc:
            raise RegistryWriteError(f"cannot write to {self.pointer_topic}: {exc}") from exc
        deadline = time.monotonic() + APPLY_TIMEOUT_S
        with self._applied:
            while self._applied_offset < meta.offset:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RegistryWriteError(
                        f"sent to {self.pointer_topic}, but not read back within {APPLY_TIMEOUT_S} s"
                    )
                self._applied.wait(left)

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                self._poll()
            except Exception:  # the follower must outlive one bad record or a broker outage
                log.exception("following %s failed", self.topic)
                self._stop.wait(1.0)

    def _poll(self) -> None:
        for tp, records in self._consumer.poll(timeout_ms=200).items():
            for record in records:
                if tp.topic == self.topic:
                    self._on_version(record.key, record.value)
                elif record.key == POINTER_KEY:
                    self._on_pointer(record.value)
                    with self._applied:
                        self._applied_offset = record.offset
                        self._applied.notify_all()

    def _on_version(self, key: bytes | None, value: bytes | None) -> None:
        if value is None:  # a tombstone: the trainer pruned this version; the replica follows (not the serving one)
            number = (key or b"").decode(errors="replace").rpartition("/")[2]
            if number.isdigit() and int(number) != self.registry.serving().version:
                self.registry.discard(int(number))
            return
        try:
            record = decode_version(value)
        except RegistryError as exc:
            self.metrics.records.labels("version", "malformed").inc()
            log.error("%s: %s", self.topic, exc)
            return
        self._see_epoch(record.epoch)
        fresh = self.registry.materialise(record.version, record.files)
        self.metrics.records.labels("version", "applied" if fresh else "duplicate").inc()
        pending = self._pending
        if pending is not None and pending.pointer.get("version") == record.version and not self._catching_up:
            self._install(pending)

    def _on_pointer(self, value: bytes | None) -> None:
        if value is None:
            return
        try:
            record = decode_pointer(value)
        except RegistryError as exc:
            self.metrics.records.labels("pointer", "malformed").inc()
            log.error("%s: %s", self.pointer_topic, exc)
            return
        if record.epoch < self.epoch:
            self.metrics.records.labels("pointer", "stale").inc()
            log.warning("ignoring a serving decision of epoch %d (newest: %d)", record.epoch, self.epoch)
            return
        self._see_epoch(record.epoch)
        if self._catching_up or record.pointer.get("version") not in self.registry.versions():
            self._pending = record  # the version record is on its way (another partition), or catching up
            return
        self._install(record)

    def _install(self, record: PointerRecord) -> None:
        self._pending = None
        self.registry.replace_serving(ServingPointer(**record.pointer))
        self.metrics.records.labels("pointer", "applied").inc()
        log.info("serving pointer -> version %s (%s)", record.pointer.get("version"), record.pointer.get("reason"))

    def _see_epoch(self, epoch: int) -> None:
        if epoch > self.epoch:
            self.epoch = epoch
            self.metrics.epoch.set(epoch)


class FollowingRegistry(AdapterRegistry):
    """A replica's registry: serving decisions go to the pointer topic, not to ``serving.json``."""

    follower: Follower

    def promote(self, version: int, reason: str, pin: bool = False, base_model: BaseModelId | None = None) -> None:
        _, meta = self.load(version)  # refuse a version that is missing or fails its hash check here already
        check_base_model(version, meta, base_model)
        current = self.serving()
        self.follower.send_pointer(ServingPointer(version, pin, reason, now(), self._history(current, version)))

    def rollback(self, reason: str = "rollback") -> int:
        current = self.serving()
        target = rollback_target(current, self.versions())
        self.load(target)
        rest = [h for h in current.history if h["version"] != target]
        self.follower.send_pointer(ServingPointer(target, True, reason, now(), rest))
        return target

    def unpin(self) -> None:
        current = self.serving()
        if current.version is not None and current.pinned:
            current.pinned = False
            current.updated_at = now()
            self.follower.send_pointer(current)

    @staticmethod
    def _history(current: ServingPointer, version: int) -> list[dict[str, Any]]:
        if current.version is None or current.version == version:
            return current.history
        entry = {"version": current.version, "reason": current.reason, "updated_at": current.updated_at}
        return [entry, *current.history[:49]]
