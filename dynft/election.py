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

Sharding (``kafka.sharded``): the same mechanism over many partitions. The *shard topic*
``<versions_topic>.shards`` has one partition per partition of the source topic, and the group
spreads them over the trainers (sticky). A trainer holds a term over the partitions it was given
(one epoch, one term record on each of them); it consumes exactly those source partitions and
so trains exactly the tasks keyed to them (``task_partition``: Kafka's default partitioner);
``held(task)`` asks the term topic partition of that task. Every change of the assignment
(a trainer joined, left or died) ends the trainer's *life* (``TermView.current`` turns false):
``dynft train`` starts a new one over the new partitions, resuming every task from its newest
published version, as a takeover does, and the election's group membership outlives the lives
so that a life's end moves no partition. With one partition a sharded trainer is the active
trainer of an active/standby pair.

The group's assignment is the authority on who holds a partition; term records fence the
trainers that no longer do. The election thread acts on the newest rebalance news only, so an
assignment already replaced writes no term record. One race is left: a trainer writing its term
just as the group moves the partition, after the new owner's record. The new owner then finds a
later record than its own, ends its life, and (hearing of no rebalance for a session, with the
group still giving it the partition) takes the term again under a newer epoch (``_stranded``).

Threads: the election thread owns the group consumer and writes the term record; the IO
thread's rebalance callbacks only queue their news; ``held`` (the training thread) reads the
flag and uses its own group-less consumer under ``_check_lock``.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Any

from kafka import ConsumerRebalanceListener

from dynft.errors import ConfigError
from dynft.events import DEFAULT_TASK
from dynft.replication import topics
from dynft.replication.feed import versions_servers
from dynft.replication.found import read_topics
from dynft.replication.records import TOP_EPOCH, next_after, number
from dynft.settings import Settings
from dynft.sources.kafka import client_config, parse_kafka_uri
from dynft.sources.kafka_compat import apply_join_fixes
from dynft.term import TermView, shard_topic, task_partition, term_topic

log = logging.getLogger(__name__)
TERM_KEY = b"term"
POLL_MS = 200
REJOIN_MARGIN_S = 10.0  # beyond the longest legitimate rebalance before a join counts as stuck
STRANDED_MARGIN_S = 5.0  # beyond a session with no rebalance news: a term taken over by a late record is retaken


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
        self.sharded = settings.kafka.sharded
        self.versions_topic = topic
        self.topic = shard_topic(topic) if self.sharded else term_topic(topic)
        self.source_servers, source_topics, group = parse_kafka_uri(source, settings.kafka.group)
        if self.sharded and len(source_topics) != 1:
            raise ConfigError(f"kafka.sharded needs one source topic, whose partitions are the shards (is {source!r})")
        self.source_topic = source_topics[0]
        self.group = group + ".leader"
        self.partitions = 1  # of the term topic: the source topic's when sharded (``start``)
        self.epoch = 0  # of the term held or last held
        self.generation = 0  # terms taken; a new one ends the current life (sharded)
        self.ended_generation = -1  # sharded: a term found taken over (a later term record) ends its life
        self.held_partitions: frozenset[int] = frozenset()
        self._offsets: dict[int, int] = {}  # this trainer's term record on each held partition
        self._holding = threading.Event()
        self._lost = threading.Event()
        # ("assigned" | "revoked", partitions) from the IO thread
        self._news: queue.SimpleQueue[tuple[str, frozenset[int]]] = queue.SimpleQueue()
        self._term_lock = threading.Lock()  # epoch, generation and partitions change together
        self._retry: tuple[str, frozenset[int]] | None = None  # news whose handling failed (election thread)
        self._quiet_since = time.monotonic()  # the last rebalance news (election thread)
        # Since a join began (a revocation, or a new member) with no assignment after it (election thread).
        self._unassigned_since: float | None = None
        self._stop = threading.Event()
        self._check_lock = threading.Lock()
        self._checker: Any = None
        self._thread = threading.Thread(target=self._run, name="dynft-election", daemon=True)

    def start(self) -> None:
        apply_join_fixes()
        k = self.settings.kafka
        if self.sharded:
            self.partitions = self._source_partitions()
        topics.ensure_topics(self.servers, self.versions_topic, k, extra={self.topic: self.partitions})
        self._checker = topics.consumer(self.servers, k)
        self._check_partitions()
        self._consumer = self._join()
        self._thread.start()
        log.info("standing by: the trainer holding %s (group %s) is the active one", self.topic, self.group)

    def _join(self) -> Any:
        """A group consumer subscribed to the term (or shard) topic, its news on a fresh queue."""
        from kafka import KafkaConsumer
        from kafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor

        k = self.settings.kafka
        consumer = KafkaConsumer(
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
        news: queue.SimpleQueue[tuple[str, frozenset[int]]] = queue.SimpleQueue()
        try:
            consumer.partitions_for_topic(self.topic)  # join with the metadata at hand (see KafkaSource)
            consumer.subscribe([self.topic], listener=_Listener(news))
        except BaseException:
            consumer.close()
            raise
        self._news = news  # news from an abandoned consumer's listener is not ours
        self._unassigned_since = time.monotonic()  # a new member waits for its first assignment
        return consumer

    def wait(self, should_exit: threading.Event) -> TermView | None:
        """Block until this trainer holds a term over some partitions; None once ``should_exit`` is set."""
        while not should_exit.is_set():
            if self._holding.wait(0.5):
                with self._term_lock:
                    view = TermView(self, self.generation, self.epoch, self.held_partitions)
                if self._holding.is_set() and view.partitions:
                    return view
        return None

    def partition_of(self, task: str) -> int:
        return task_partition(task, self.partitions) if self.sharded else 0

    def held(self, task: str = DEFAULT_TASK) -> bool:
        """Whether ``task``'s term is still this trainer's: not revoked, no later term record on its partition."""
        partition = self.partition_of(task)
        if not self._holding.is_set() or partition not in self.held_partitions:
            return False
        from kafka import TopicPartition
        from kafka.errors import KafkaError

        tp = TopicPartition(self.topic, partition)
        try:
            with self._check_lock:
                end = self._checker.end_offsets([tp])[tp]
        except KafkaError as exc:  # cannot tell: publishing waits for the broker like everything else
            log.warning("cannot check the term on %s (%s); not publishing now", self.topic, exc)
            return False
        if end > self._offsets.get(partition, -2) + 1:
            self._lose(f"a later term record is on {self.topic} partition {partition}")
            return False
        return True

    @property
    def holding(self) -> bool:
        """Whether the term is held now (not suspended by a rebalance; no broker round trip)."""
        return self._holding.is_set()

    @property
    def lost(self) -> bool:
        """Whether a term this trainer held has ended for good (the flag only: no broker round trip).

        Sharded trainers never lose for good: a lost partition ends the life, not the trainer."""
        return self._lost.is_set()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        for client in (getattr(self, "_consumer", None), self._checker):
            if client is not None:
                client.close()

    def _lose(self, why: str) -> None:
        # Logged even while a rebalance suspends the term: a life that ends unseen cannot be diagnosed.
        suspended = "" if self._holding.is_set() else ", suspended by a rebalance at the time"
        log.warning("trainer epoch %d lost its term (%s%s): publishing and training stop", self.epoch, why, suspended)
        self._holding.clear()
        if self.sharded:
            self.ended_generation = self.generation  # this life ends; the rejoin brings the next term
        else:
            self._lost.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._consumer.poll(timeout_ms=POLL_MS)  # heartbeats and rebalances; term records are read apart
                self._act()
            except Exception:  # the election thread must outlive a broker outage; held() stays false meanwhile
                log.exception("election on %s failed; trying again", self.topic)
                self._stop.wait(1.0)

    def _act(self) -> None:
        """Act on the newest rebalance news only: an assignment that a later revocation already
        replaced must not write term records (the partitions may be another trainer's by now).
        News whose handling failed (the term record could not be written) is tried again first."""
        news = [self._retry] if self._retry is not None else []
        while not self._news.empty():
            news.append(self._news.get_nowait())
        if news:
            self._retry, self._quiet_since = news[-1], time.monotonic()
            if any(kind == "revoked" for kind, _ in news):
                self._holding.clear()
            if news[-1][0] == "assigned":
                self._unassigned_since = None
            elif self._unassigned_since is None:
                self._unassigned_since = time.monotonic()
            self._on_news(*news[-1])
            self._retry = None
        elif self._stranded():
            self._take_term(self.held_partitions)
        elif self._join_stalled():
            self._rejoin()

    def _stranded(self) -> bool:
        """Sharded: whether this trainer's term was found taken over, yet the group still gives it the
        same partitions a session after the last rebalance news. A term record written late by a
        trainer that has since lost those partitions does that; a trainer that really lost them (a
        pause past its session) hears of a rebalance within a session, and does not come here."""
        if not self.sharded or self.ended_generation != self.generation or not self.held_partitions:
            return False
        quiet = time.monotonic() - self._quiet_since > self.settings.kafka.session_timeout_ms / 1000 + STRANDED_MARGIN_S
        mine = frozenset(tp.partition for tp in self._consumer.assignment())
        return quiet and mine == self.held_partitions

    def _join_stalled(self) -> bool:
        """Whether a join began (a rebalance's revocation, empty for a standby, or a new member) and no
        assignment came for longer than any rebalance lasts (it waits at most max_poll_interval_ms for
        the slowest member): a standby stuck so would never take over a dead trainer's term."""
        k = self.settings.kafka
        limit = (k.max_poll_interval_ms + k.session_timeout_ms) / 1000 + REJOIN_MARGIN_S
        return self._unassigned_since is not None and time.monotonic() - self._unassigned_since > limit

    def _rejoin(self) -> None:
        """The last resort for a join that never ends (as ``KafkaSource`` has one): a new member joins
        afresh, then the stuck one leaves. The term stays suspended until the new member's assignment,
        which resumes it when the partitions come back and no later term record exists."""
        log.warning("group %s: no assignment since a rebalance long past; rejoining with a new consumer", self.group)
        self._unassigned_since = time.monotonic()  # if the new member cannot be made, the next try waits as long
        stuck, self._consumer = self._consumer, self._join()
        try:
            stuck.close()
        except Exception as exc:  # a stuck client may fail in any way; the new one is in place already
            log.warning("closing the stalled election consumer: %s", exc)

    def _on_news(self, news: str, partitions: frozenset[int]) -> None:
        """A rebalance: every one revokes first (eager protocol), so a revocation only suspends the term;
        the assignment that follows resumes it if it gives back the same partitions and no later term
        was written on them. Otherwise the term is lost (one active trainer), or a new term over the
        new partitions begins (sharded: a new life)."""
        if news == "revoked":
            if self._offsets:
                log.info("term of epoch %d suspended: group %s is rebalancing", self.epoch, self.group)
            self._holding.clear()  # no record is sent until the assignment says who holds what
            return
        if self._lost.is_set():
            return
        kept = partitions == self.held_partitions and all(
            self._newest_offset(p) == offset for p, offset in self._offsets.items()
        )
        if self._offsets and kept:
            if not self._holding.is_set():
                log.info("term of epoch %d resumed after a rebalance: the same partition(s) came back", self.epoch)
            self._holding.set()
        elif self.sharded:
            self._take_term(partitions)
        elif not partitions and self._offsets:
            self._lose("the term partition went to another trainer")
        elif partitions and not self._offsets:
            self._take_term(partitions)
        elif partitions:
            self._lose(f"a later term record is on {self.topic}")

    def _newest_offset(self, partition: int) -> int:
        from kafka import TopicPartition

        tp = TopicPartition(self.topic, partition)
        with self._check_lock:
            return int(self._checker.end_offsets([tp])[tp]) - 1

    def _take_term(self, partitions: frozenset[int]) -> None:
        """Write the next term record on each of ``partitions``; the term is held once the broker acknowledged them."""
        if not partitions:  # sharded, and more trainers than partitions: this one stands by
            self._holding.clear()
            with self._term_lock:
                self.generation += 1
                self.held_partitions, self._offsets = frozenset(), {}
            log.info("standing by: every partition of %s is held by another trainer", self.topic)
            return
        epoch = next_after(self._newest_term(), self._newest_versions_epoch())
        value = json.dumps({"epoch": epoch, "holder": self.identity}).encode()
        producer = topics.producer(self.servers, self.settings.kafka)
        try:
            sent = {p: producer.send(self.topic, key=TERM_KEY, value=value, partition=p) for p in sorted(partitions)}
            offsets = {p: int(future.get(timeout=30).offset) for p, future in sent.items()}
        finally:
            producer.close()
        with self._term_lock:
            self.epoch, self._offsets, self.held_partitions = epoch, offsets, frozenset(partitions)
            self.generation += 1
        self._holding.set()
        log.info(
            "active trainer now: epoch %d (%s) over partition(s) %s of %s",
            epoch,
            self.identity,
            ",".join(map(str, sorted(partitions))),
            self.topic,
        )

    def _newest_term(self) -> int:
        """The highest epoch on any partition of the term topic. A record that is no term record
        (written by something else) is skipped with a warning: raising on it blocked every take of
        a term for good, since the compacted topic keeps it until a term record replaces it."""
        from kafka import TopicPartition

        parts = [TopicPartition(self.topic, p) for p in range(self.partitions)]
        newest = 0
        with self._check_lock:
            self._checker.assign(parts)
            self._checker.seek_to_beginning(*parts)
            ends = self._checker.end_offsets(parts)
            while any(self._checker.position(tp) < ends[tp] for tp in parts):
                for tp, records in self._checker.poll(timeout_ms=500).items():
                    for record in records:
                        try:
                            epoch = number(json.loads(record.value), "epoch")
                        except (ValueError, TypeError, RecursionError) as exc:
                            log.warning("%s: skipping a malformed term record at %d (%s)", tp, record.offset, exc)
                            continue
                        if epoch >= TOP_EPOCH:  # counted on, the next epochs' records would be malformed
                            log.warning(
                                "%s: skipping a term record at %d of epoch %d, which no trainer counts to",
                                tp,
                                record.offset,
                                epoch,
                            )
                            continue
                        newest = max(newest, epoch)
        return newest

    def _newest_versions_epoch(self) -> int:
        consumer = topics.consumer(self.servers, self.settings.kafka)
        try:
            return read_topics(consumer, self.versions_topic).log.epoch
        finally:
            consumer.close()

    def _source_partitions(self) -> int:
        consumer = topics.consumer(self.source_servers, self.settings.kafka)
        try:
            found = consumer.partitions_for_topic(self.source_topic)
        finally:
            consumer.close()
        if not found:
            raise ConfigError(
                f"kafka.sharded: source topic {self.source_topic} does not exist; create it with one partition per "
                "shard before starting sharded trainers"
            )
        return len(found)

    def _check_partitions(self) -> None:
        have = len(self._checker.partitions_for_topic(self.topic) or ())
        if have != self.partitions:
            raise ConfigError(
                f"topic {self.topic} has {have} partition(s), the source topic {self.source_topic} {self.partitions}: "
                f"they must match (kafka-topics --alter --topic {self.topic} --partitions {self.partitions})"
            )


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """kafka-python's rebalance callbacks (its IO thread): news for the election thread only. Every
    revocation is news, an empty one too (a standby's, or a first join's): it starts the wait for
    the assignment that ``_join_stalled`` times."""

    def __init__(self, news: queue.SimpleQueue[tuple[str, frozenset[int]]]) -> None:
        self.news = news

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.news.put(("revoked", frozenset(tp.partition for tp in revoked)))

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.news.put(("assigned", frozenset(tp.partition for tp in assigned)))
