"""The trainer's side: every published version and serving decision goes to the versions topics.

``VersionsFeed.sync`` is the publisher's one hook (after each publish / promote): it sends the
registry's versions the topic lacks (or holds with another content hash), a tombstone for each
version on the topic that the registry no longer has (pruned since, or while the trainer was
down: the feed reads the versions topic at start and compares), then the serving pointer if it
changed. A sync that fails (a broker outage, or a term suspended by a rebalance) leaves its
task *withheld*: the training loop's tick asks ``due`` and syncs again after 1, 2, 4 ... 30 s, so
what was published meanwhile reaches the topic even if nothing is published after it (the stream
over). Said once per kind of failure until the topic is up to date again; the local registry stays the
trainer's own truth.

A pointer decision made on a replica (admin promote / rollback) arrives on the pointer topic;
a thread of the feed (the only reader of its consumer, and the owner of its ``PointerLog``)
applies it to the local registry, so the gate sees the pin and does not promote over it.
Decisions are ordered by offset (``records.PointerLog``): a replica's decision is adopted unless
one of the trainer's own, later on the topic and not void, supersedes it. ``_lock`` guards
each lane's ``sent_pointer``, ``own_last`` and ``topic_serving``, the state that thread and the
publisher's thread share.

Tasks: one feed per trainer process carries every task (``lane``): each task has a *lane*, its
registry and what the topics hold of it, under the task's own keys (``records``). Versions the
topic holds and the local registry lacks (published by another trainer before a takeover, or
on a host whose disk was lost) are written into the registry when the lane opens, so the
trainer resumes from the newest version published by anyone.

Fencing (``dynft.election``): ``term`` says whether this trainer still holds its term over a
task; it is asked before every record of the task sent, and a feed whose term is lost sends
nothing more. Records carry the term's epoch and the task's shard (``records``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from dynft.backoff import Backoff
from dynft.errors import ConfigError, DynftError, RegistryError, ReplicationError, TermLostError
from dynft.events import DEFAULT_TASK
from dynft.pointer import ServingPointer
from dynft.registry import META, AdapterRegistry
from dynft.replication import topics
from dynft.replication.found import content_hash, read_topics
from dynft.replication.records import (
    PointerRecord,
    VersionRecord,
    decode_pointer,
    encode_pointer,
    encode_version,
    next_epoch,
    pointer_key,
    pointer_topic,
    task_of_pointer_key,
    version_key,
)
from dynft.settings import Settings
from dynft.sources.kafka import parse_kafka_uri

log = logging.getLogger(__name__)
SEND_TIMEOUT_S = 30.0
PROCESS = uuid.uuid4().hex[:6]  # containers on one host's network can share a host name and pid 1
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 30.0  # a withheld task's syncs: 1, 2, 4 ... 30 s apart


class Term(Protocol):
    """An elected trainer's term (``dynft.term.TermView``): its epoch, whether it still holds a
    task's (sharded trainers hold terms over some tasks only), and the shard a task's records are in."""

    @property
    def epoch(self) -> int: ...

    def held(self, task: str = ...) -> bool: ...

    def shard(self, task: str) -> int: ...


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


def open_feed(settings: Settings, registry: AdapterRegistry, term: Term | None = None) -> VersionsFeed | None:
    """The feed when ``kafka.versions_topic`` is set, else None.

    ``term``: the elected term (``dynft.election``), whose epoch the records carry and which is
    asked before every send; without one, the state directory's next epoch, never fenced.
    """
    topic = settings.kafka.versions_topic
    if topic is None:
        return None
    feed = VersionsFeed(settings, registry, versions_servers(settings), topic, term=term)
    feed.start()
    return feed


@dataclass
class Lane:
    """One task's registry and what the topics hold of it.

    ``sent_versions`` and the retry state: the publisher's thread only; the rest under the feed's ``_lock``.
    """

    task: str
    registry: AdapterRegistry
    sent_versions: dict[int, str] = field(default_factory=dict)  # on the topic as in the registry -> hash
    retry: Backoff = field(default_factory=lambda: Backoff(RETRY_FIRST_S, RETRY_MAX_S))  # withheld while failing
    failed_with: type[DynftError] | None = None  # the kind of the last failure (logged when it changes)
    sent_pointer: dict[str, Any] | None = None
    own_last: tuple[int, bool] | None = None  # offset and pinned of this trainer's newest decision
    topic_serving: int | None = None


@dataclass
class TaskFeed:
    """What a task's publisher holds: the shared feed and its task (``sync`` as ``VersionsFeed.sync``)."""

    feed: VersionsFeed
    task: str

    def sync(self) -> None:
        self.feed.sync(self.task)

    def due(self) -> bool:
        return self.feed.due(self.task)

    def sent(self, version: int) -> bool:
        return self.feed.sent(version, self.task)


class VersionsFeed:
    def __init__(
        self,
        settings: Settings,
        registry: AdapterRegistry,
        servers: list[str],
        topic: str,
        epoch: int | None = None,
        term: Term | None = None,
    ) -> None:
        self.settings, self.registry, self.servers, self.topic = settings, registry, servers, topic
        self.max_bytes = settings.kafka.versions_max_message_bytes
        topics.ensure_topics(servers, topic, settings.kafka)
        self._consumer = topics.consumer(servers, settings.kafka)
        found = read_topics(self._consumer, topic)
        self._log = found.log  # the feed thread's from now on; folded exactly as every replica folds it
        if term is not None:
            epoch = term.epoch
        self.epoch = epoch if epoch is not None else next_epoch(settings.state_dir, found.log.epoch)
        # Whose records are whose: two trainers that took the same epoch (started together without
        # kafka.election) must not take each other's decisions for an operator's.
        self.origin = f"trainer-{self.epoch}-{socket.gethostname()[:64]}-{os.getpid()}-{PROCESS}"
        self._twins: set[str] = set()  # the feed's thread: other trainers seen writing at our epoch
        self.held: Callable[[str], bool] = term.held if term is not None else (lambda task: True)
        self.shard: Callable[[str], int] = term.shard if term is not None else (lambda task: 0)
        self._producer = topics.producer(servers, settings.kafka)
        self._found = found  # records of tasks whose lane is not open yet (their publishers come later)
        self._lock = threading.Lock()
        self._lanes: dict[str, Lane] = {}  # written by the publishers' thread, read by the feed's
        self._unadopted: dict[str, tuple[int, PointerRecord]] = {}  # the feed's thread: decisions not written here
        self._fenced_at = self.epoch  # the feed's thread: the newest epoch above ours said so far
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow_pointer, name="dynft-versions-feed", daemon=True)
        self._open_lane(DEFAULT_TASK, registry)
        log.info("versions go to %s on %s (trainer epoch %d)", topic, ",".join(servers), self.epoch)

    def lane(self, task: str, registry: AdapterRegistry) -> TaskFeed:
        """Task ``task``'s share of the feed (its publisher's ``feed``); its first sync sends what it lacks."""
        if task not in self._lanes:
            self._open_lane(task, registry)
            self.sync(task)
        return TaskFeed(self, task)

    def _open_lane(self, task: str, registry: AdapterRegistry) -> None:
        """Bring ``registry`` up to the topic (versions it lacks are written) and remember the topic's state."""
        mine = {v: r for (t, v), r in self._found.versions.items() if t == task}
        for key in [k for k in self._found.versions if k[0] == task]:
            del self._found.versions[key]
        with self._lock:
            found = self._found.pointers.pop(task, None)
        here = registry.versions()
        serving = found.pointer.get("version") if found else None
        for version, record in sorted(mine.items()):
            # Newer than this registry's newest (another trainer published it) or what serves; an
            # older one missing here was pruned here while no feed ran, and gets its tombstone.
            if version not in here and (version > max(here, default=0) or version == serving):
                registry.materialise(version, record.files)
                log.info("task %s: version %d from the versions topic (epoch %d)", task, version, record.epoch)
        lane = Lane(task, registry, self._same_here(registry, {v: content_hash(r) for v, r in mine.items()}))
        lane.topic_serving = found.pointer.get("version") if found else None
        with self._lock:
            self._lanes = {**self._lanes, task: lane}
        if found is not None:
            self._adopt_newer(lane, found.pointer)
        lane.sent_pointer = None  # the first sync sends the pointer: the replicas learn the new epoch

    def start(self) -> None:
        self.sync()
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        self._consumer.close()
        self._producer.close()

    def sync(self, task: str = DEFAULT_TASK) -> None:
        """Send what the topics lack, tombstone what the registry lost, then the pointer (publisher's hook)."""
        lane = self._lanes[task]
        try:
            versions = lane.registry.versions()
            for version in versions:
                if version not in lane.sent_versions:
                    self._send_version(lane, version)
            for version in sorted(set(lane.sent_versions) - set(versions)):  # pruned here: a tombstone
                if version != lane.topic_serving:  # a replica started later still finds what serves
                    self._send(self.topic, version_key(version, task), None, task)
                del lane.sent_versions[version]
            pointer = lane.registry.serving()
            with self._lock:
                if pointer.version is not None and pointer.__dict__ != lane.sent_pointer:
                    record = PointerRecord(
                        self.epoch, self.origin, dict(pointer.__dict__), self._log.seen, task, self.shard(task)
                    )
                    offset = self._send(pointer_topic(self.topic), pointer_key(task), encode_pointer(record), task)
                    lane.sent_pointer = dict(pointer.__dict__)
                    lane.own_last = (offset, bool(pointer.pinned))
                    lane.topic_serving = pointer.version
        except ConfigError as exc:  # the caller stops on it; a retry meets it again
            self._withhold(lane, exc, logging.ERROR, str(exc))
            raise
        except TermLostError as exc:
            self._withhold(lane, exc, logging.WARNING, f"{exc}; sent when the term is held again")
        except DynftError as exc:
            self._withhold(lane, exc, logging.ERROR, f"{exc}; tried again in a while and at each publish")
        else:
            if lane.retry.failures:
                failed = lane.retry.failures
                log.info("task %s: the versions topic is up to date again after %d failed sync(s)", task, failed)
            lane.retry.reset()
            lane.failed_with = None

    def _withhold(self, lane: Lane, exc: DynftError, level: int, why: str) -> None:
        """A failed sync: said once for each kind of failure until the topic is up to date again;
        ``due`` schedules the next try."""
        if type(exc) is not lane.failed_with:
            log.log(level, "task %s: versions topic not updated: %s", lane.task, why)
        lane.failed_with = type(exc)
        lane.retry.failed()

    def due(self, task: str = DEFAULT_TASK) -> bool:
        """Whether ``task``'s last sync failed and the time to try again has come (publisher's thread)."""
        return self._lanes[task].retry.due()

    def sent(self, version: int, task: str = DEFAULT_TASK) -> bool:
        """Whether ``version`` of ``task`` is on the versions topic (sent by this feed or found there)."""
        return version in self._lanes[task].sent_versions

    @staticmethod
    def _same_here(registry: AdapterRegistry, on_topic: dict[int, str]) -> dict[int, str]:
        """The topic's versions minus those the registry holds with other contents (sent again)."""
        here = set(registry.versions())
        same = {}
        for version, digest in on_topic.items():
            try:
                if version not in here or registry.meta(version).get("content_hash") == digest:
                    same[version] = digest
            except RegistryError as exc:
                log.warning("version %d: %s; sending it again", version, exc)
        return same

    def _send_version(self, lane: Lane, version: int) -> None:
        path = lane.registry.path(version)
        try:
            files = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
        except OSError as exc:
            raise RegistryError(f"version {version}: cannot read it to send ({exc.strerror})") from exc
        if META not in files:
            raise RegistryError(f"version {version}: no {META} to send")
        value = encode_version(VersionRecord(version, self.epoch, self.origin, files, lane.task, self.shard(lane.task)))
        if len(value) > self.max_bytes:
            raise ConfigError(
                f"version {version} is {len(value)} bytes on the versions topic, above "
                f"kafka.versions_max_message_bytes ({self.max_bytes}); raise that setting (the topics' "
                "max.message.bytes follow it when dynft creates them)"
            )
        self._send(self.topic, version_key(version, lane.task), value, lane.task)
        lane.sent_versions[version] = str(json.loads(files[META]).get("content_hash"))

    def _send(self, topic: str, key: bytes, value: bytes | None, task: str) -> int:
        """Send one record of ``task`` and wait for the broker; returns its offset. ``TermLostError`` once
        the task's term is lost."""
        from kafka.errors import KafkaError

        if not self.held(task):
            raise TermLostError(
                f"trainer epoch {self.epoch} does not hold task {task}'s term now (suspended by a rebalance, or "
                f"lost): nothing is sent to {topic} meanwhile"
            )
        try:
            return int(self._producer.send(topic, key=key, value=value).get(timeout=SEND_TIMEOUT_S).offset)
        except KafkaError as exc:
            raise ReplicationError(f"cannot write to {topic}: {exc}") from exc

    def _adopt_newer(self, lane: Lane, pointer: dict[str, Any]) -> None:
        """At start: take the topic's pointer when it is newer than the local one and its version is here."""
        local = lane.registry.serving()
        if pointer.get("updated_at", "") <= local.updated_at or pointer == local.__dict__:
            return
        self._adopt(lane, pointer)

    def _adopt(self, lane: Lane, pointer: dict[str, Any]) -> None:
        if pointer.get("version") not in lane.registry.versions():
            log.warning(
                "the pointer topic serves version %s of task %s, which this trainer does not have",
                pointer.get("version"),
                lane.task,
            )
            return
        lane.registry.replace_serving(ServingPointer(**pointer))
        with self._lock:
            lane.sent_pointer = dict(pointer)
            lane.topic_serving = pointer.get("version")
        log.info(
            "task %s: serving version %s as decided on the pointer topic (%s)",
            lane.task,
            pointer["version"],
            pointer.get("reason"),
        )

    def _superseded(self, lane: Lane, offset: int, record: PointerRecord) -> bool:
        """Whether this trainer's own newest decision comes later on the topic and is not void by ``record``."""
        with self._lock:
            own = lane.own_last
        if own is None or own[0] <= offset:
            return False
        _, own_pinned = own
        return own_pinned or not record.pointer.get("pinned")  # an unpinned one made before a pin is void

    def _follow_pointer(self) -> None:
        while not self._stop.is_set():
            try:
                for records in self._consumer.poll(timeout_ms=500).values():
                    for record in records:
                        if task_of_pointer_key(record.key) is not None and record.value is not None:
                            self._read_pointer(record)
                for task, (offset, record) in list(self._unadopted.items()):  # a local write failed: again
                    if self._superseded(self._lanes[task], offset, record):
                        del self._unadopted[task]
                    else:
                        self._try_adopt(self._lanes[task], offset, record)
            except Exception:  # the feed's thread must outlive one bad record or broker outage
                log.exception("following the pointer topic failed")
                self._stop.wait(1.0)

    def _read_pointer(self, record: Any) -> None:
        """One record of the pointer topic; a malformed one is skipped (the rest of its poll is not)."""
        try:
            pointer = decode_pointer(record.value)
        except RegistryError as exc:
            log.warning("skipping a record of %s at offset %d: %s", pointer_topic(self.topic), record.offset, exc)
            return
        self._on_pointer(record.offset, pointer)

    def _on_pointer(self, offset: int, record: PointerRecord) -> None:
        # Fenced: a newer epoch in the shard of a task this trainer publishes (sharded trainers hold
        # different epochs at once, each in its own shards: another's record there says nothing).
        mine = record.task in self._lanes and record.shard == self.shard(record.task)
        if mine and record.epoch > self._fenced_at:
            self._fenced_at = record.epoch  # said once per newer epoch: every later record of it says the same
            log.error(
                "the pointer topic holds a decision of trainer epoch %d (%s, offset %d), newer than this trainer's "
                "%d: replicas ignore this trainer's versions and decisions from now on. A newer trainer took over "
                "(then stop this one), or the record was written by hand: restart this trainer to take an epoch "
                "above it",
                record.epoch,
                record.origin[:64],
                offset,
                self.epoch,
            )
        outcome = self._log.admit(record, offset)  # folded as replicas fold it, whoever wrote it
        lane = self._lanes.get(record.task)
        if lane is None:  # a task this trainer has not opened yet: its lane adopts it when it opens
            if outcome == "applied":
                with self._lock:
                    self._found.pointers[record.task] = record
            return
        if (
            mine
            and record.epoch == self.epoch
            and record.origin != self.origin
            and record.origin.startswith("trainer-")
        ):
            self._twin(record.origin, offset)  # another trainer under this trainer's epoch: no operator's decision
            return
        if outcome != "applied" or record.origin == self.origin or self._superseded(lane, offset, record):
            if outcome != "applied":
                log.info(
                    "a %s serving decision at offset %d (task %s, version %s) is ignored",
                    outcome,
                    offset,
                    record.task,
                    record.pointer.get("version"),
                )
            return
        self._unadopted.pop(record.task, None)  # a later decision replaces one not written here yet
        if record.pointer != lane.registry.serving().__dict__:
            self._try_adopt(lane, offset, record)

    def _twin(self, origin: str, offset: int) -> None:
        """Another trainer writes under this trainer's epoch: its decisions are not adopted, and it is said."""
        if origin in self._twins:
            return
        self._twins.add(origin)
        log.error(
            "another trainer (%s) writes to %s under this trainer's epoch %d (offset %d): two trainers started "
            "together without kafka.election, whose versions interleave on the replicas. Stop one, or set "
            "kafka.election = true on both (one trains, the other stands by)",
            origin[:64],
            pointer_topic(self.topic),
            self.epoch,
            offset,
        )

    def _try_adopt(self, lane: Lane, offset: int, record: PointerRecord) -> None:
        """Adopt a replica's decision; if ``serving.json`` cannot be written here (a full or read-only
        disk), the decision is kept and tried again at each poll of the pointer topic (said once)."""
        failing = self._unadopted.pop(lane.task, None) is not None  # this very decision failed before
        try:
            self._adopt(lane, record.pointer)
        except RegistryError as exc:
            if not failing:
                log.error(
                    "task %s: the serving decision at offset %d not adopted (tried again): %s", lane.task, offset, exc
                )
            self._unadopted[lane.task] = (offset, record)
