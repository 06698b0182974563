"""A serving replica's side: follow the versions topics into a registry of its own.

``Follower`` reads both compacted topics into the replica's own registry directory (in its own
state directory): each version record is written as the version directory its publisher
wrote, each pointer record replaces ``serving.json``. The inference engine's watcher then
loads, checks (content hash, base-model fingerprint, tensor shapes) and flips exactly as on
the trainer's host; a version that fails is refused, counted (``dynft_swap_failures_total``),
listed as refused in ``/v1/adapters`` and never installed, and the replica keeps serving.

At start ``start`` reads both topics to their current end, keeping the version records in
memory, and writes only the serving version before the server answers; the follower's thread
(the only user of its consumer, and the owner of the backlog from then on) writes the rest in
the background, newest serving history first, then removes versions of an earlier run that
the topic no longer holds. The replica's registry is a cache of the topics (rebuilt at every
start), so nothing in it is fsynced. Retention follows the trainer's: a version the trainer
prunes is a tombstone on the topic, and leaves the replica too (not the serving one). A pointer
record whose version has not arrived yet waits for it; ``PointerLog`` ignores one with an
older epoch than the newest seen in its shard (a stale trainer; see ``records``) or one that
unpins without having seen the newest pin (``records.voided``). A replica's admin decisions go
to the pointer topic through ``following.FollowingRegistry`` and come back here like any other.

A local write that fails (a full or read-only disk) loses nothing: the version goes back to the
backlog and the pointer stays pending, and the follower's thread tries them again (about twice a second)
until they are written, whether or not more records arrive (said once until writes work again).

Tasks: a version or pointer record of a task other than ``default`` (its own keys, see
``records``) goes to that task's registry under ``<registry>/tasks/<task>/``, where the engine's
watcher finds the task's lane, so a replica serves every task its trainers publish. Version
records are fenced like pointer records: one of an older epoch than the newest seen in its shard
on either topic comes from a trainer that lost its term, and is ignored (``stale``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from dynft.errors import ConfigError, RegistryError, RegistryWriteError, SourceError
from dynft.events import DEFAULT_TASK
from dynft.pointer import ServingPointer
from dynft.registry import AdapterRegistry
from dynft.replication import topics
from dynft.replication.following import FollowingRegistry
from dynft.replication.records import (
    PointerLog,
    PointerRecord,
    VersionRecord,
    decode_pointer,
    decode_version,
    encode_pointer,
    parse_version_key,
    pointer_key,
    task_of_pointer_key,
)
from dynft.replication.records import pointer_topic as pointer_topic_of
from dynft.settings import Settings
from dynft.settings.intake import versions_topic_problem
from dynft.sources.kafka import parse_kafka_uri
from dynft.tasks import task_registry_dir

log = logging.getLogger(__name__)
Key = tuple[str, int]  # (task, version)
APPLY_TIMEOUT_S = 10.0
POLL_MS = 200  # an idle poll; a record that arrives ends the broker's long poll at once
SAY_FAILURES_S = 60.0  # failed local writes are said at most this often


def parse_follow_uri(uri: str) -> tuple[list[str], str]:
    """``kafka://HOST:PORT[,HOST:PORT]/TOPIC`` -> (brokers, versions topic)."""
    try:
        servers, names, _ = parse_kafka_uri(uri, "unused")
    except SourceError as exc:  # said as a source's: here it is the versions topic
        raise ConfigError(f"--follow {uri!r}: expected kafka://HOST:PORT/VERSIONS_TOPIC ({exc})") from exc
    if len(names) != 1:
        raise ConfigError(f"--follow {uri!r}: name exactly one versions topic")
    problem = versions_topic_problem(names[0])
    if problem is not None:
        raise ConfigError(f"--follow {uri!r}: {problem}")
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
        self.up = Gauge("dynft_replica_brokers_up", "1 while the versions topics' brokers answer", registry=registry)
        for kind in ("version", "pointer"):
            for outcome in ("applied", "duplicate", "stale", "void", "malformed"):
                self.records.labels(kind, outcome)


class Follower:
    def __init__(
        self, settings: Settings, registry: AdapterRegistry, uri: str, metrics_registry: CollectorRegistry
    ) -> None:
        self.settings, self.registry = settings, registry
        self.servers, self.topic = parse_follow_uri(uri)
        self.pointer_topic = pointer_topic_of(self.topic)
        self.metrics = ReplicaMetrics(metrics_registry)
        self.on_change: Callable[[], None] | None = None  # called after a flip of serving.json (engine.nudge)
        self._log = PointerLog()  # follower thread only (start() before the thread runs)
        self._registries: dict[str, AdapterRegistry] = {DEFAULT_TASK: registry}  # under _registries_lock
        self._registries_lock = threading.Lock()
        self._pending: dict[str, PointerRecord] = {}  # task -> a pointer whose version has not arrived yet
        self._backlog: dict[Key, VersionRecord] = {}  # read at start, not yet written (popped under the lock)
        self._backlog_lock = threading.Lock()  # an admin request may need a backlogged version written now
        # Held from taking a version off the backlog until it is on disk: an admin request that finds
        # it gone from the backlog then knows it is written, not half-way (the follower's thread may be writing it).
        self._write_lock = threading.RLock()
        self._live: set[Key] = set()  # versions with a record (not a tombstone) on the topic
        self._cleaned = False
        self._failing = False  # the last local write failed (the follower's thread; see _failed)
        self._failure_said, self._failure_said_at = False, -float("inf")  # the last failure said, and when
        self._catching_up = False
        self._applied = threading.Condition()
        self._applied_offset = -1  # pointer topic: offset of the last record handled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="dynft-follow", daemon=True)
        self._consumer: Any = None
        self._producer: Any = None
        self._brokers = topics.BrokerWatch(
            self.servers, settings.kafka, self.metrics.up, self._stop, settings.kafka.lag_interval_s
        )

    @property
    def epoch(self) -> int:
        """The newest trainer epoch seen on either topic."""
        return self._log.epoch

    def start(self) -> bool:
        """Read both topics to their end and write the serving version; the rest follows in the
        background. Waits for the brokers first; False if stopped meanwhile (``stop``)."""
        from kafka import TopicPartition

        if not topics.await_brokers(self.servers, self.settings.kafka, self._stop):
            return False
        started = time.monotonic()
        if topics.ensure_topics(self.servers, self.topic, self.settings.kafka):
            log.warning("created %s: no trainer has written to it yet (a new deployment, or a typo?)", self.topic)
        self._consumer = topics.consumer(self.servers, self.settings.kafka)
        self._producer = topics.producer(self.servers, self.settings.kafka)
        checked = time.monotonic()
        parts = [TopicPartition(self.topic, 0), TopicPartition(self.pointer_topic, 0)]
        self._consumer.assign(parts)  # assigned, not subscribed: no consumer group to join
        self._consumer.seek_to_beginning(*parts)
        ends = self._consumer.end_offsets(parts)
        self._catching_up = True  # only the newest pointer matters until the end is reached
        while not self._stop.is_set() and any(self._consumer.position(tp) < ends[tp] for tp in parts):
            self._poll(POLL_MS)
        self._catching_up = False
        for pending in list(self._pending.values()):
            self._apply_pointer(pending)
        for task, record in self._pending.items():  # read to the end, and its version is not there
            log.warning(
                "task %s: the pointer topic serves version %s, which the versions topic does not hold: not ready "
                "for this task until that version arrives or an operator promotes another one",
                task,
                record.pointer.get("version"),
            )
        log.info(
            "checked the versions topics in %.1f s, read them to their end in %.1f s: serving version %s "
            "(%d more versions written in the background)",
            checked - started,
            time.monotonic() - checked,
            self.registry.serving().version,
            len(self._backlog),
        )
        if self._stop.is_set():  # cancelled while it read the topics
            return False
        self._thread.start()
        self._brokers.start()
        return True

    def cancel(self) -> None:
        """Make a ``start`` under way return False (from a signal handler: only sets an event)."""
        self._stop.set()

    @property
    def cancelled(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        for client in (self._consumer, self._producer):
            if client is not None:
                client.close()

    def send_pointer(self, pointer: ServingPointer, task: str = DEFAULT_TASK) -> None:
        """Publish a serving decision made here; returns once this replica has applied it."""
        from kafka.errors import KafkaError

        # Read from a request's thread while the follower's advances them: ints, read whole.
        epoch, shard = self._log.fence_of(task)
        record = PointerRecord(epoch, "replica", dict(pointer.__dict__), self._log.seen, task, shard)
        try:
            value = encode_pointer(record)
            meta = self._producer.send(self.pointer_topic, key=pointer_key(task), value=value).get(
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

    def ensure(self, version: int, task: str = DEFAULT_TASK) -> None:
        """Write ``version`` now if it is still in the backlog (an admin decision needs it on disk)."""
        with self._write_lock:
            record = self._take(task, version)
            if record is not None:
                try:
                    self._write(record)
                except RegistryError:  # a local write failed: the backlog keeps it, to be tried again
                    with self._backlog_lock:
                        self._backlog.setdefault((task, version), record)
                    raise

    def _take(self, task: str, version: int) -> VersionRecord | None:
        with self._backlog_lock:
            return self._backlog.pop((task, version), None)

    def registry_of(self, task: str) -> AdapterRegistry:
        """Task ``task``'s registry in this replica, made on first use (by the follower's or the engine's thread).

        A ``FollowingRegistry`` too: an admin decision for the task goes to the pointer topic.
        """
        with self._registries_lock:
            registry = self._registries.get(task)
            if registry is None:
                s = self.settings.registry
                root = task_registry_dir(self.registry.root, task)
                made = FollowingRegistry(root, s.keep_last, s.keep_serving_history)
                made.follower, made.task = self, task
                registry = self._registries[task] = made
            return registry

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                self._poll(0 if self._backlog and not self._failing else POLL_MS)  # new records first
                self._write_backlog()  # then one backlog version
                self._install_pending()
            except Exception:  # the follower must outlive one bad record or a broker outage
                log.exception("following %s failed", self.topic)
                self._stop.wait(1.0)

    def _failed(self, what: str, exc: RegistryError) -> None:
        """A local write failed: said once until one succeeds, and at most once a minute (on a disk
        that is nearly full, writes fail and succeed in turn); the caller keeps what it could not write."""
        self._failing = True
        now = time.monotonic()
        if not self._failure_said and now - self._failure_said_at >= SAY_FAILURES_S:
            log.error("%s not written (tried again until it is): %s", what, exc)
            self._failure_said, self._failure_said_at = True, now

    def _wrote(self) -> None:
        if self._failing and self._failure_said:  # the recovery from a failure that was said
            log.info("the replica's registry is writable again")
            self._failure_said = False
        self._failing = False

    def _install_pending(self) -> None:
        """Install each pending pointer whose version is here now: it arrived after the pointer, or
        was written from the backlog after a failed write (each round of the follower's thread)."""
        for record in list(self._pending.values()):
            if record.pointer.get("version") in self.registry_of(record.task).versions():
                self._install(record)

    def _poll(self, timeout_ms: int) -> None:
        for tp, records in self._consumer.poll(timeout_ms=timeout_ms).items():
            for record in records:
                try:
                    self._on_record(tp.topic, record)
                except Exception:  # a record no rule foresaw: it alone is skipped, not the rest of the poll
                    self.metrics.records.labels("version" if tp.topic == self.topic else "pointer", "malformed").inc()
                    log.exception("%s: skipping the record at offset %d", tp.topic, record.offset)

    def _on_record(self, topic: str, record: Any) -> None:
        if topic == self.topic:
            self._on_version(record.key, record.value, record.offset)
            return
        try:
            if task_of_pointer_key(record.key) is not None:
                self._on_pointer(record.key, record.value, record.offset)
            else:  # no decision dynft wrote: said, not silently passed over
                self.metrics.records.labels("pointer", "malformed").inc()
                where, key = record.offset, record.key
                log.error("%s: skipping the record at offset %d: key %.80r names no task", topic, where, key)
        finally:  # handled, whatever happened: an admin request waiting for this offset goes on
            with self._applied:
                self._applied_offset = record.offset
                self._applied.notify_all()

    def _on_version(self, key: bytes | None, value: bytes | None, offset: int) -> None:
        where = parse_version_key(key)
        if value is None:  # a tombstone: the trainer pruned this version; the replica follows (not the serving one)
            if where is not None:
                task, number = where
                self._live.discard(where)
                self._take(task, number)
                registry = self.registry_of(task)
                if number != registry.serving().version:
                    try:
                        registry.discard(number)
                    except RegistryError as exc:  # left on disk; an unlisted version goes at the next start
                        self._failed(f"the removal of version {number} of task {task}", exc)
            return
        try:
            record = decode_version(value)
            if where != (record.task, record.version):
                raise RegistryError(f"key {key!r} does not name version {record.version} of task {record.task}")
        except RegistryError as exc:
            self.metrics.records.labels("version", "malformed").inc()
            log.error("%s: skipping the record at offset %d: %s", self.topic, offset, exc)
            return
        if not self._log.admit_epoch(record.epoch, record.shard, record.task):
            self.metrics.records.labels("version", "stale").inc()
            log.warning("ignoring version %d of task %s from stale epoch %d", record.version, record.task, record.epoch)
            return
        self.metrics.epoch.set(self._log.epoch)
        self._live.add(where)
        if self._catching_up:  # written once the end is reached: the serving one first
            self._backlog[where] = record
            return
        with self._backlog_lock:
            self._backlog[where] = record  # taken off again once written (ensure)
        try:
            self.ensure(record.version, record.task)
        except RegistryError as exc:
            self._failed(f"version {record.version} of task {record.task}", exc)
            return

    def _write(self, record: VersionRecord) -> None:
        fresh = self.registry_of(record.task).materialise(record.version, record.files, durable=False)
        self._wrote()
        self.metrics.records.labels("version", "applied" if fresh else "duplicate").inc()

    def _write_backlog(self) -> None:
        """Write one backlogged version (the newest of the serving history first), or clean up once."""
        if not self._backlog:
            if not self._cleaned:
                self._cleaned = True
                self._remove_unlisted()
            return
        history = [(t, h.get("version")) for t, r in list(self._registries.items()) for h in r.serving().history]
        with self._backlog_lock:
            key = next((k for k in history if k in self._backlog), max(self._backlog, default=None))
        if key is not None and isinstance(key[1], int):
            try:
                self.ensure(key[1], key[0])
            except RegistryError as exc:
                self._failed(f"version {key[1]} of task {key[0]}", exc)

    def _remove_unlisted(self) -> None:
        """Versions left by an earlier run whose records the topic no longer holds (pruned meanwhile)."""
        for task, registry in list(self._registries.items()):
            serving = registry.serving().version
            for version in registry.versions():
                if (task, version) not in self._live and version != serving:
                    registry.discard(version)
                    log.info("removed version %d of task %s: no longer on %s", version, task, self.topic)

    def _on_pointer(self, key: bytes | None, value: bytes | None, offset: int) -> None:
        if value is None:  # dynft never deletes a decision: only a newer one replaces it
            log.warning("%s: ignoring a tombstone at offset %d (key %.80r)", self.pointer_topic, offset, key)
            return
        try:
            record = decode_pointer(value)
            if record.task != task_of_pointer_key(key):
                raise RegistryError(f"key {key!r} does not decide for task {record.task}")
        except RegistryError as exc:
            self.metrics.records.labels("pointer", "malformed").inc()
            log.error("%s: skipping the record at offset %d: %s", self.pointer_topic, offset, exc)
            return
        outcome = self._log.admit(record, offset)
        self.metrics.epoch.set(self._log.epoch)
        if outcome != "applied":
            self.metrics.records.labels("pointer", outcome).inc()
            log.warning(
                "ignoring a %s serving decision at offset %d (version %s, epoch %d, seen %d; epoch %d, pin at %d)",
                outcome,
                offset,
                record.pointer.get("version"),
                record.epoch,
                record.seen,
                self._log.epoch,
                self._log.pin_offset(record.task),
            )
            return
        if self._catching_up:
            self._pending[record.task] = record  # only the newest applied decision is installed at the end
            return
        self._apply_pointer(record)

    def _apply_pointer(self, record: PointerRecord) -> None:
        """Install ``record`` once its version is on disk (written now if it is in the backlog)."""
        version = record.pointer.get("version")
        if isinstance(version, int):
            try:
                self.ensure(version, record.task)
            except RegistryError as exc:
                self._pending[record.task] = record
                self._failed(f"version {version} of task {record.task}", exc)
                return
        if version not in self.registry_of(record.task).versions():
            self._pending[record.task] = record  # the version record is on its way (another partition)
            return
        self._install(record)

    def _install(self, record: PointerRecord) -> None:
        self._pending[record.task] = record  # until serving.json is written
        try:
            self.registry_of(record.task).replace_serving(ServingPointer(**record.pointer), durable=False)
        except RegistryError as exc:
            self._failed(f"task {record.task}'s serving pointer (version {record.pointer.get('version')})", exc)
            return
        self._wrote()
        self._pending.pop(record.task, None)
        self.metrics.records.labels("pointer", "applied").inc()
        log.info(
            "task %s: serving pointer -> version %s (%s)",
            record.task,
            record.pointer.get("version"),
            record.pointer.get("reason"),
        )
        if self.on_change is not None:
            self.on_change()
