"""The trainer's side: every published version and serving decision goes to the versions topics.

``VersionsFeed.sync`` is the publisher's one hook (after each publish / promote): it sends the
registry's versions the topic lacks (or holds with another content hash), a tombstone for each
version on the topic that the registry no longer has (pruned since, or while the trainer was
down: the feed reads the versions topic at start and compares), then the serving pointer if it
changed. A failed send is logged and retried by the next sync; the local registry stays the
trainer's own truth.

A pointer decision made on a replica (admin promote / rollback) arrives on the pointer topic;
a thread of the feed (the only reader of its consumer, and the owner of its ``PointerLog``)
applies it to the local registry, so the gate sees the pin and does not promote over it.
Decisions are ordered by offset (``records.PointerLog``): a replica's decision is adopted unless
one of the trainer's own, later on the topic and not void, supersedes it. ``_lock`` guards
``_sent_pointer`` and ``_own_last``, the state that thread and the publisher's thread share.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from dynft.errors import ConfigError, DynftError, RegistryError, ReplicationError
from dynft.registry import META, AdapterRegistry, ServingPointer
from dynft.replication import topics
from dynft.replication.records import (
    POINTER_KEY,
    PointerLog,
    PointerRecord,
    VersionRecord,
    decode_pointer,
    decode_version,
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


@dataclass
class TopicState:
    """What the versions topics hold when the trainer starts."""

    log: PointerLog = field(default_factory=PointerLog)
    pointer: PointerRecord | None = None  # the newest applied decision
    versions: dict[int, str] = field(default_factory=dict)  # version on the topic -> its content hash
    end: int = 0  # the pointer topic's end offset


def read_topics(consumer: Any, topic: str) -> TopicState:
    """Both topics up to their current end: the folded pointer log and the versions present.

    Leaves ``consumer`` on the pointer topic alone, where it stopped (the feed's thread reads on
    from there, without fetching back the adapters the trainer sends).
    """
    from kafka import TopicPartition

    parts = [TopicPartition(topic, 0), TopicPartition(pointer_topic(topic), 0)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    ends = consumer.end_offsets(parts)
    state = TopicState(end=ends[parts[1]])
    while any(consumer.position(tp) < ends[tp] for tp in parts):
        for tp, records in consumer.poll(timeout_ms=500).items():
            for record in records:
                try:
                    _read_one(state, tp.topic == topic, record)
                except RegistryError as exc:
                    log.warning("skipping a record of %s at offset %d: %s", tp.topic, record.offset, exc)
    position = consumer.position(parts[1])
    consumer.assign([parts[1]])
    consumer.seek(parts[1], position)
    return state


def _read_one(state: TopicState, is_version: bool, record: Any) -> None:
    if is_version:
        number = record.key.decode(errors="replace").rpartition("/")[2] if record.key else ""
        if record.value is None and number.isdigit():
            state.versions.pop(int(number), None)
        elif record.value is not None:
            version = decode_version(record.value)
            meta = json.loads(version.files.get(META, b"{}"))
            state.versions[version.version] = str(meta.get("content_hash"))
    elif record.key == POINTER_KEY and record.value is not None:
        pointer = decode_pointer(record.value)
        if state.log.admit(pointer, record.offset) == "applied":
            state.pointer = pointer


class VersionsFeed:
    def __init__(self, settings: Settings, registry: AdapterRegistry, servers: list[str], topic: str) -> None:
        self.settings, self.registry, self.servers, self.topic = settings, registry, servers, topic
        self.max_bytes = settings.kafka.versions_max_message_bytes
        topics.ensure_topics(servers, topic, settings.kafka)
        self._consumer = topics.consumer(servers, settings.kafka)
        found = read_topics(self._consumer, topic)
        self._log = found.log  # the feed thread's from now on; folded exactly as every replica folds it
        self.epoch = next_epoch(settings.state_dir, found.log.epoch)
        self.origin = f"trainer-{self.epoch}"
        self._producer = topics.producer(servers, settings.kafka)
        self._sent_versions = self._same_here(found.versions)  # on the topic as in the registry
        self._lock = threading.Lock()
        self._sent_pointer: dict[str, Any] | None = None
        self._own_last: tuple[int, bool] | None = None  # offset and pinned of this trainer's newest decision
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow_pointer, name="dynft-versions-feed", daemon=True)
        self._topic_serving = found.pointer.pointer.get("version") if found.pointer else None
        if found.pointer is not None:
            self._adopt_newer(found.pointer.pointer)
        self._sent_pointer = None  # the first sync sends the pointer: the replicas learn the new epoch
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
        """Send what the topics lack, tombstone what the registry lost, then the pointer (publisher's hook)."""
        try:
            versions = self.registry.versions()
            for version in versions:
                if version not in self._sent_versions:
                    self._send_version(version)
            for version in sorted(set(self._sent_versions) - set(versions)):  # pruned here: a tombstone
                if version != self._topic_serving:  # a replica started later still finds what serves
                    self._send(self.topic, version_key(version), None)
                del self._sent_versions[version]
            pointer = self.registry.serving()
            with self._lock:
                if pointer.version is not None and pointer.__dict__ != self._sent_pointer:
                    record = PointerRecord(self.epoch, self.origin, dict(pointer.__dict__), seen=self._log.seen)
                    offset = self._send(pointer_topic(self.topic), POINTER_KEY, encode_pointer(record))
                    self._sent_pointer = dict(pointer.__dict__)
                    self._own_last = (offset, bool(pointer.pinned))
                    self._topic_serving = pointer.version
        except ConfigError:
            raise
        except DynftError as exc:
            log.error("versions topic not updated (next publish tries again): %s", exc)

    def _same_here(self, on_topic: dict[int, str]) -> dict[int, str]:
        """The topic's versions minus those the registry holds with other contents (sent again)."""
        here = set(self.registry.versions())
        same = {}
        for version, digest in on_topic.items():
            try:
                if version not in here or self.registry.meta(version).get("content_hash") == digest:
                    same[version] = digest
            except RegistryError as exc:
                log.warning("version %d: %s; sending it again", version, exc)
        return same

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
        self._sent_versions[version] = str(json.loads(files[META]).get("content_hash"))

    def _send(self, topic: str, key: bytes, value: bytes | None) -> int:
        """Send one record and wait for the broker; returns its offset."""
        from kafka.errors import KafkaError

        try:
            return int(self._producer.send(topic, key=key, value=value).get(timeout=SEND_TIMEOUT_S).offset)
        except KafkaError as exc:
            raise ReplicationError(f"cannot write to {topic}: {exc}") from exc

    def _adopt_newer(self, pointer: dict[str, Any]) -> None:
        """At start: take the topic's pointer when it is newer than the local one and its version is here."""
        local = self.registry.serving()
        if pointer.get("updated_at", "") <= local.updated_at or pointer == local.__dict__:
            return
        self._adopt(pointer)

    def _adopt(self, pointer: dict[str, Any]) -> None:
        if pointer.get("version") not in self.registry.versions():
            log.warning("the pointer topic serves version %s, which this trainer does not have", pointer.get("version"))
            return
        self.registry.replace_serving(ServingPointer(**pointer))
        with self._lock:
            self._sent_pointer = dict(pointer)
            self._topic_serving = pointer.get("version")
        log.info("serving version %s as decided on the pointer topic (%s)", pointer["version"], pointer.get("reason"))

    def _superseded(self, offset: int, record: PointerRecord) -> bool:
        """Whether this trainer's own newest decision comes later on the topic and is not void by ``record``."""
        with self._lock:
            own = self._own_last
        if own is None or own[0] <= offset:
            return False
        _, own_pinned = own
        return own_pinned or not record.pointer.get("pinned")  # an unpinned one made before a pin is void

    def _follow_pointer(self) -> None:
        while not self._stop.is_set():
            try:
                for records in self._consumer.poll(timeout_ms=500).values():
                    for record in records:
                        if record.key == POINTER_KEY and record.value is not None:
                            self._on_pointer(record.offset, decode_pointer(record.value))
            except Exception:  # the feed's thread must outlive one bad record or broker outage
                log.exception("following the pointer topic failed")
                self._stop.wait(1.0)

    def _on_pointer(self, offset: int, record: PointerRecord) -> None:
        outcome = self._log.admit(record, offset)
        if outcome != "applied" or record.origin == self.origin or self._superseded(offset, record):
            if outcome != "applied":
                log.info(
                    "a %s serving decision at offset %d (version %s) is ignored",
                    outcome,
                    offset,
                    record.pointer.get("version"),
                )
            return
        if record.pointer != self.registry.serving().__dict__:
            self._adopt(record.pointer)
