"""The trainer's side: every published version and serving decision goes to the versions topics.

``VersionsFeed.sync`` is the publisher's one hook (after each publish / promote): it sends the
registry's versions not yet sent, a tombstone for each sent version retention has pruned since,
then the serving pointer if it changed. A failed send is
logged and retried by the next sync; the local registry stays the trainer's own truth.

A pointer decision made on a replica (admin promote / rollback) arrives on the pointer topic;
a thread of the feed (the only reader of its consumer) applies it to the local registry, so the
gate sees the pin and does not promote over it. ``_lock`` guards ``_sent_pointer``, the one
piece of state that thread and the publisher's thread share.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from dynft.errors import ConfigError, DynftError, RegistryError, ReplicationError
from dynft.registry import META, AdapterRegistry, ServingPointer
from dynft.replication import topics
from dynft.replication.records import (
    POINTER_KEY,
    PointerRecord,
    VersionRecord,
    decode_pointer,
    encode_pointer,
    encode_version,
    next_epoch,
    pointer_topic,
    version_key,
)
from dynft.settings import Settings
from dynft.sources.kafka import parse_kafka_uri

log = logging.getLogger(__name__)
SEND_TIMEOUT_S = 30.0


def versions_servers(settings: Settings) -> list[str]:
    """The brokers of the versions topics: ``kafka.versions_bootstrap`` or the Kafka source's."""
    k = settings.kafka
    if k.versions_bootstrap:
        return [s for s in k.versions_bootstrap.split(",") if s]
    if settings.source.uri.startswith("kafka://"):
        return parse_kafka_uri(settings.source.uri, k.group)[0]
    raise ConfigError(
        f"kafka.versions_topic is set ({k.versions_topic}) but no broker is known: "
        "set kafka.versions_bootstrap or use a kafka:// source"
    )


def open_feed(settings: Settings, registry: AdapterRegistry) -> VersionsFeed | None:
    """The feed when ``kafka.versions_topic`` is set, else None."""
    topic = settings.kafka.versions_topic
    if topic is None:
        return None
    feed = VersionsFeed(settings, registry, versions_servers(settings), topic)
    feed.start()
    return feed


def read_pointer_log(consumer: Any, topic: str) -> tuple[list[PointerRecord], int]:
    """Every pointer record up to the current end of ``topic``, and that end offset."""
    from kafka import TopicPartition

    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    end = consumer.end_offsets([tp])[tp]
    out = []
    while consumer.position(tp) < end:
        for record in consumer.poll(timeout_ms=500).get(tp, []):
            if record.key == POINTER_KEY and record.value is not None:
                try:
                    out.append(decode_pointer(record.value))
                except RegistryError as exc:
                    log.warning("skipping a pointer record at offset %d: %s", record.offset, exc)
    return out, end


class VersionsFeed:
    def __init__(self, settings: Settings, registry: AdapterRegistry, servers: list[str], topic: str) -> None:
        self.settings, self.registry, self.servers, self.topic = settings, registry, servers, topic
        self.max_bytes = settings.kafka.versions_max_message_bytes
        topics.ensure_topics(servers, topic, settings.kafka)
        self._consumer = topics.consumer(servers, settings.kafka)
        history, _ = read_pointer_log(self._consumer, pointer_topic(topic))
        self.epoch = next_epoch(settings.state_dir, max((r.epoch for r in history), default=0))
        self.origin = f"trainer-{self.epoch}"
        self._producer = topics.producer(servers, settings.kafka)
        self._sent_versions: set[int] = set()
        self._lock = threading.Lock()
        self._sent_pointer: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow_pointer, name="dynft-versions-feed", daemon=True)
        if history:
            self._adopt_newer(history[-1].pointer)
        log.info("versions go to %s on %s (trainer epoch %d)", topic, ",".join(servers), self.epoch)

    def start(self) -> None:
        self.sync()
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        self._consumer.close()
        self._producer.close()

    def sync(self) -> None:
        """Send the versions not yet sent, then the serving pointer if it changed (publisher's hook)."""
        try:
            versions = self.registry.versions()
            for version in versions:
                if version not in self._sent_versions:
                    self._send_version(version)
            for version in sorted(self._sent_versions - set(versions)):  # pruned here: a tombstone
                self._send(self.topic, version_key(version), None)
                self._sent_versions.discard(version)
            pointer = self.registry.serving()
            with self._lock:
                if pointer.version is not None and pointer.__dict__ != self._sent_pointer:
                    self._send(pointer_topic(self.topic), POINTER_KEY, encode_pointer(self._record(pointer)))
                    self._sent_pointer = dict(pointer.__dict__)
        except ConfigError:
            raise
        except DynftError as exc:
            log.error("versions topic not updated (next publish tries again): %s", exc)

    def _record(self, pointer: ServingPointer) -> PointerRecord:
        return PointerRecord(self.epoch, self.origin, dict(pointer.__dict__))

    def _send_version(self, version: int) -> None:
        path = self.registry.path(version)
        try:
            files = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
        except OSError as exc:
            raise RegistryError(f"version {version}: cannot read it to send ({exc.strerror})") from exc
        if META not in files:
            raise RegistryError(f"version {version}: no {META} to send")
        value = encode_version(VersionRecord(version, self.epoch, self.origin, files))
        if len(value) > self.max_bytes:
            raise ConfigError(
                f"version {version} is {len(value)} bytes on the versions topic, above "
                f"kafka.versions_max_message_bytes ({self.max_bytes}); raise that setting (the topics' "
                "max.message.bytes follow it when dynft creates them)"
            )
        self._send(self.topic, version_key(version), value)
        self._sent_versions.add(version)

    def _send(self, topic: str, key: bytes, value: bytes | None) -> None:
        from kafka.errors import KafkaError

        try:
            self._producer.send(topic, key=key, value=value).get(timeout=SEND_TIMEOUT_S)
        except KafkaError as exc:
            raise ReplicationError(f"cannot write to {topic}: {exc}") from exc

    def _adopt_newer(self, pointer: dict[str, Any]) -> None:
        """Take a pointer decided elsewhere when it is newer than the local one and its version is here."""
        local = self.registry.serving()
        if pointer.get("updated_at", "") <= local.updated_at or pointer == local.__dict__:
            return
        if pointer.get("version") not in self.registry.versions():
            log.warning("the pointer topic serves version %s, which this trainer does not have", pointer.get("version"))
            return
        self.registry.replace_serving(ServingPointer(**pointer))
        with self._lock:
            self._sent_pointer = dict(pointer)
        log.info("serving version %s as decided on the pointer topic (%s)", pointer["version"], pointer.get("reason"))

    def _follow_pointer(self) -> None:
        while not self._stop.is_set():
            try:
                for records in self._consumer.poll(timeout_ms=500).values():
                    for record in records:
                        if record.key != POINTER_KEY or record.value is None:
                            continue
                        decoded = decode_pointer(record.value)
                        if decoded.origin != self.origin and decoded.epoch >= self.epoch:
                            self._adopt_newer(decoded.pointer)
            except Exception:  # the feed's thread must outlive one bad record or broker outage
                log.exception("following the pointer topic failed")
                self._stop.wait(1.0)
