"""One active trainer among several, elected through Kafka (``kafka.election``).

Mechanism: every ``dynft train`` of one configuration joins the consumer group ``<group>.leader``
on the one-partition compacted *term topic* ``<versions_topic>.term``. Kafka's group coordinator
gives that one partition to exactly one live member: the member holding it is the active
trainer; the others stand by, blocked before they open their source or train anything. Why this
mechanism: it is the failure detector the trainers already depend on for their events (session
timeout, heartbeats, rebalances), it needs no system besides Kafka and compares no clocks.

Terms: a member that is given the partition reads the term topic to its end and writes a term
record (key ``term``) whose epoch is one above every epoch seen on the term topic and the
versions topics; the term is held once the broker has acknowledged it. Only the holder writes,
and each holder reads its predecessor's record first, so epochs only grow. The group's
generation number would be simpler, but it restarts at 0 when the group's metadata expires.

Fencing: ``held`` is asked before every record the trainer sends (``VersionsFeed``) and on every
turn of the training loop. It is false once the partition was revoked, and, because a paused
trainer (SIGSTOP, a long GC, a partition) learns of its revocation only when its own thread runs
again, also whenever the term topic holds a term record after this trainer's own (one broker
round trip, asked before every send). Every rebalance revokes the partition first (the eager
protocol), which only suspends the term; the assignment that follows resumes it when the
partition came back and no later term record exists (the sticky assignor keeps it with its
holder when a standby joins), and ends it otherwise. A trainer that lost its term stops (``TermLostError``) and
is started again as a standby by whatever runs it (``dynft run``'s supervisor, Kubernetes).
Replicas ignore records of an epoch lower than the highest they have seen (``stale``), which
covers the one window left: a record sent between the check and the new term's first record.

Threads: the election thread owns the group consumer and writes the term record; the IO
thread's rebalance callbacks only queue their news; ``held`` (the training thread) reads the
flag and uses its own group-less consumer under ``_check_lock``.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from typing import Any

from kafka import ConsumerRebalanceListener

from dynft.errors import ConfigError, ReplicationError
from dynft.registry import AdapterRegistry
from dynft.replication import topics
from dynft.replication.feed import read_topics, versions_servers
from dynft.settings import Settings
from dynft.sources.base import Source
from dynft.sources.kafka import KafkaSource, client_config, parse_kafka_uri
from dynft.sources.kafka_compat import apply_join_fixes

log = logging.getLogger(__name__)
TERM_KEY = b"term"
POLL_MS = 200


def term_topic(versions_topic: str) -> str:
    return f"{versions_topic}.term"


class Election:
    """``wait`` blocks until this trainer holds the term; ``held`` says whether it still does."""

    def __init__(self, settings: Settings, identity: str) -> None:
        topic, source = settings.kafka.versions_topic, settings.source.uri
        if topic is None or not source.startswith("kafka://"):
            raise ConfigError(
                f"kafka.election needs kafka.versions_topic (is {topic!r}) and a kafka:// source (is {source!r})"
            )
        self.settings, self.identity = settings, identity
        self.servers = versions_servers(settings)
        self.versions_topic, self.topic = topic, term_topic(topic)
        self.group = parse_kafka_uri(source, settings.kafka.group)[2] + ".leader"
        self.epoch = 0  # of the term held or last held
        self._offset = -1  # this trainer's term record on the term topic
        self._holding = threading.Event()
        self._lost = threading.Event()
        self._news: queue.SimpleQueue[str] = queue.SimpleQueue()  # "assigned" / "revoked" from the IO thread
        self._stop = threading.Event()
        self._check_lock = threading.Lock()
        self._checker: Any = None
        self._thread = threading.Thread(target=self._run, name="dynft-election", daemon=True)

    def start(self) -> None:
        from kafka import KafkaConsumer
        from kafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor

        apply_join_fixes()
        topics.ensure_topics(self.servers, self.versions_topic, self.settings.kafka, extra=[self.topic])
        k = self.settings.kafka
        self._consumer = KafkaConsumer(
            bootstrap_servers=self.servers,
            group_id=self.group,
            enable_auto_commit=False,
            session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=max(100, k.session_timeout_ms // 3),
            max_poll_interval_ms=k.max_poll_interval_ms,  # this thread polls every POLL_MS: rebalances end soon
            # Sticky: a standby that joins does not take the partition from the live holder.
            partition_assignment_strategy=(StickyPartitionAssignor,),
            **client_config(k),
        )
        self._consumer.partitions_for_topic(self.topic)  # join with the metadata at hand (see KafkaSource)
        self._consumer.subscribe([self.topic], listener=_Listener(self._news))
        self._checker = topics.consumer(self.servers, k)
        self._thread.start()
        log.info("standing by: the trainer holding %s (group %s) is the active one", self.topic, self.group)

    def wait(self, should_exit: threading.Event) -> bool:
        """Block until this trainer holds the term (True) or ``should_exit`` is set (False)."""
        while not self._holding.wait(0.5):
            if should_exit.is_set():
                return False
        return True

    def held(self) -> bool:
        """Whether the term is still this trainer's: not revoked, and no later term record on the topic."""
        if not self._holding.is_set():
            return False
        from kafka import TopicPartition
        from kafka.errors import KafkaError

        tp = TopicPartition(self.topic, 0)
        try:
            with self._check_lock:
                end = self._checker.end_offsets([tp])[tp]
        except KafkaError as exc:  # cannot tell: publishing waits for the broker like everything else
            log.warning("cannot check the term on %s (%s); not publishing now", self.topic, exc)
            return False
        if end > self._offset + 1:
            self._lose(f"a later term record is on {self.topic}")
            return False
        return True

    @property
    def lost(self) -> bool:
        """Whether a term this trainer held has ended (the flag only: no broker round trip)."""
        return self._lost.is_set()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        for client in (getattr(self, "_consumer", None), self._checker):
            if client is not None:
                client.close()

    def _lose(self, why: str) -> None:
        if self._holding.is_set():
            log.warning("trainer epoch %d lost its term (%s): publishing and training stop", self.epoch, why)
        self._holding.clear()
        self._lost.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._consumer.poll(timeout_ms=POLL_MS)  # heartbeats and rebalances; term records are read apart
                while not self._news.empty():
                    self._on_news(self._news.get_nowait())
            except Exception:  # the election thread must outlive a broker outage; held() stays false meanwhile
                log.exception("election on %s failed", self.topic)
                self._stop.wait(1.0)

    def _on_news(self, news: str) -> None:
        """A rebalance: every one revokes first (eager protocol), so a revocation only suspends the term;
        the assignment that follows resumes it if no later term was written, else the term is lost."""
        if news == "revoked":
            self._holding.clear()  # no record is sent until the assignment says who holds the partition
        elif news == "unassigned" and self._offset >= 0:
            self._lose("the term partition went to another trainer")
        elif news == "assigned" and not self._lost.is_set():
            if self._offset < 0:
                self._take_term()
            elif self._newest_offset() == self._offset:
                self._holding.set()
            else:
                self._lose(f"a later term record is on {self.topic}")

    def _newest_offset(self) -> int:
        from kafka import TopicPartition

        tp = TopicPartition(self.topic, 0)
        with self._check_lock:
            return int(self._checker.end_offsets([tp])[tp]) - 1

    def _take_term(self) -> None:
        """Write the next term record; the term is held once the broker acknowledged it."""
        epoch = max(self._newest_term(), self._newest_versions_epoch()) + 1
        value = json.dumps({"epoch": epoch, "holder": self.identity}).encode()
        producer = topics.producer(self.servers, self.settings.kafka)
        try:
            meta = producer.send(self.topic, key=TERM_KEY, value=value).get(timeout=30)
        finally:
            producer.close()
        self.epoch, self._offset = epoch, int(meta.offset)
        self._holding.set()
        log.info("active trainer now: epoch %d (%s, term record at offset %d)", epoch, self.identity, meta.offset)

    def _newest_term(self) -> int:
        from kafka import TopicPartition

        tp = TopicPartition(self.topic, 0)
        newest = 0
        with self._check_lock:
            self._checker.assign([tp])
            self._checker.seek_to_beginning(tp)
            end = self._checker.end_offsets([tp])[tp]
            while self._checker.position(tp) < end:
                for record in self._checker.poll(timeout_ms=500).get(tp, []):
                    try:
                        newest = max(newest, int(json.loads(record.value)["epoch"]))
                    except (ValueError, KeyError, TypeError) as exc:
                        raise ReplicationError(f"{self.topic}: malformed term record ({exc})") from exc
        return newest

    def _newest_versions_epoch(self) -> int:
        consumer = topics.consumer(self.servers, self.settings.kafka)
        try:
            return read_topics(consumer, self.versions_topic).log.epoch
        finally:
            consumer.close()


def fence_commits(source: Source, election: Election) -> None:
    """No offset commit from ``source`` once ``election``'s term is lost (the new term's trainer commits)."""
    if isinstance(source, KafkaSource):
        source.may_commit = lambda: not election.lost


def outdated(checkpoint_state: dict[str, Any], registry: AdapterRegistry) -> bool:
    """Whether a checkpoint predates a version in ``registry`` (another trainer's, from the versions topic).

    An elected trainer that held the term before resumes from the newest published version then,
    not from its own older state: its next version must descend from the newest one.
    """
    latest = checkpoint_state.get("publisher", {}).get("latest_version") or 0
    newest = max(registry.versions(), default=0)
    if newest > latest:
        log.warning(
            "the checkpoint knows versions up to %d, the versions topic %d: resuming from the topic", latest, newest
        )
    return newest > latest


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """kafka-python's rebalance callbacks (its IO thread): news for the election thread only."""

    def __init__(self, news: queue.SimpleQueue[str]) -> None:
        self.news = news

    def on_partitions_revoked(self, revoked: Any) -> None:
        if revoked:
            self.news.put("revoked")

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.news.put("assigned" if assigned else "unassigned")
