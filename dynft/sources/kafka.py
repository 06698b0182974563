"""The Kafka source: a well-mannered consumer-group member with at-least-once commits.

``kafka://HOST:PORT[,HOST:PORT]/TOPIC[,TOPIC]?group=GROUP`` (other settings: ``[kafka]``).

- Offsets are committed only through ``commit``, which the training loop calls after a durable
  checkpoint with the furthest processed position per partition; the commit itself runs on
  the polling thread (kafka-python's consumer is not thread-safe).
- Backpressure pauses every assigned partition and keeps polling, so a slow training step
  never costs the group membership; ``resume`` restarts fetching.
- On a rebalance the listener (which runs on kafka-python's IO thread, where a blocking
  commit would raise) commits what is already checkpointed for the revoked partitions with
  ``commit_async``. Once the new assignment is known it reports the partitions that went to
  other members, so the intake drops their queued records for the new owner to read again.
  A partition that comes back keeps its fetch position in kafka-python 3.0, so its queued
  records stay: dropping them would skip them for good.
- ``may_commit`` is asked before every commit: an elected trainer that lost its term
  (``dynft.election``) commits nothing more, whatever it had checkpointed.
- Sharded trainers (``kafka.sharded``) set ``partitions``: the consumer is assigned those
  partitions rather than subscribed, since the election's group decides who owns which; it
  starts from, and commits to, the group's offsets all the same.
- After a restart, positions from the checkpoint that are ahead of the group's committed
  offsets (a crash between checkpoint and commit) are committed before joining.
- Brokers that do not answer at ``open`` are waited for: ``poll`` tries again with backoff
  and returns nothing meanwhile (``dynft_kafka_up`` 0). A broker that answers and refuses
  (credentials, certificate) is a ``KafkaRefusedError``, a configuration error.

Threads: the *polling* thread (the intake's) owns the consumer and every field below; the
rebalance listener and the commit callbacks run on kafka-python's IO thread and only put
their news on ``_events``, which the polling thread applies at its next poll. The one thing
the IO thread reads is ``Offsets.uncommitted`` (``dynft.sources.kafka_offsets``), an immutable
snapshot the polling thread replaces whole (never mutates), so a read sees one consistent version.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections.abc import Callable
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, OffsetAndMetadata, TopicPartition
from kafka.errors import KafkaError, UnsupportedCodecError

from dynft.errors import BrokersUnavailableError, SourceError
from dynft.metrics import KafkaMetrics
from dynft.settings import KafkaSettings
from dynft.sources.base import Positions, Record, Source
from dynft.sources.kafka_compat import apply_join_fixes
from dynft.sources.kafka_connect import (
    client_config,
    commit_checkpoint_ahead,
    is_refusal,
    parse_kafka_uri,
    probe,
    refused,
    security_warnings,
    stream_of,
)
from dynft.sources.kafka_offsets import News, Offsets
from dynft.sources.kafka_unreadable import HOLD_MAX_S, Holds, apply_read_fixes, partition_of

__all__ = ["KafkaSource", "client_config", "parse_kafka_uri", "stream_of"]

log = logging.getLogger(__name__)
REJOIN_MARGIN_S = 10.0  # beyond the longest legitimate rebalance before a join counts as stuck
RECONNECT_FIRST_S = 0.5  # first wait before trying unanswering brokers again; doubles per try


class KafkaSource(Source):
    def __init__(self, uri: str, settings: KafkaSettings, metrics: KafkaMetrics) -> None:
        self.uri = uri
        self.servers, self.topics, self.group = parse_kafka_uri(uri, settings.group)
        self.settings = settings
        self.metrics = metrics
        self._consumer: KafkaConsumer | None = None
        self._events: queue.SimpleQueue[News] = queue.SimpleQueue()  # from kafka-python's IO thread
        self._offsets = Offsets(metrics)  # what is committed (dynft.sources.kafka_offsets)
        # Owned by the polling thread:
        self._revoked_at: float | None = None  # a rebalance took partitions and none came back yet
        self._revoking: set[TopicPartition] = set()  # revoked by a rebalance that has not assigned yet
        self._revoked: set[str] = set()  # went to other members: the intake drops their queued records
        self._paused = False
        self._resume: Positions = {}
        self._lag_at = 0.0
        self._ends: dict[TopicPartition, int] = {}  # end offsets at the last lag measurement
        self._read: dict[TopicPartition, int] = {}  # offset after the last record polled
        self._holds = Holds()  # partitions whose fetched records could not be read (kafka_unreadable)
        self._down_since: float | None = None  # monotonic time the brokers stopped answering
        self._reconnect_at = 0.0  # while not connected: the next try
        self._reconnect_in = RECONNECT_FIRST_S
        # Asked before every commit, by either thread (dynft.election: none once the term is lost).
        self.may_commit: Callable[[], bool] = lambda: True
        # kafka.sharded: the partitions of this trainer's term, assigned (not subscribed) before ``open``;
        # the group's offsets are still read and committed, by the one trainer holding each partition.
        self.partitions: frozenset[int] | None = None
        for warning in security_warnings(settings):
            log.warning(warning)

    # -- lifecycle -----------------------------------------------------------------------

    def resume_from(self, positions: Positions) -> None:
        self._resume = {k: v for k, v in positions.items() if k.rpartition("/")[0] in self.topics}

    def open(self) -> None:
        """Join the group; brokers that do not answer are waited for by ``poll``.

        Raises ``KafkaRefusedError`` (a configuration error) when a broker answers and refuses.
        """
        apply_join_fixes()
        apply_read_fixes()
        self._try_connect()

    def _try_connect(self) -> bool:
        """Connect, or schedule the next try (with backoff) when no broker answers."""
        try:
            self._connect()
        except BrokersUnavailableError as exc:
            if self._down_since is None:  # once per outage, not once per try
                self._down_since = time.monotonic()
                log.warning("%s: %s; waiting for the brokers", self.uri, exc)
            self.metrics.up.set(0)
            self._reconnect_at = time.monotonic() + self._reconnect_in
            self._reconnect_in = min(self._reconnect_in * 2, self.settings.reconnect_max_s)
            return False
        if self._down_since is not None:
            log.warning("%s: the brokers answer after %.0f s", self.uri, time.monotonic() - self._down_since)
            self._down_since = None
        self._reconnect_in = RECONNECT_FIRST_S
        return True

    def _connect(self) -> None:
        """A new consumer, subscribed; ``BrokersUnavailableError`` or ``KafkaRefusedError`` if not."""
        s = self.settings
        config = client_config(s)
        probe(self.servers, config)  # a refusal is told from an outage here, before kafka-python retries it
        try:
            consumer = KafkaConsumer(
                bootstrap_servers=self.servers,
                group_id=self.group,
                enable_auto_commit=False,
                auto_offset_reset=s.auto_offset_reset,
                isolation_level=s.isolation_level,
                max_poll_records=s.max_poll_records,
                max_poll_interval_ms=s.max_poll_interval_ms,
                session_timeout_ms=s.session_timeout_ms,
                fetch_max_bytes=s.fetch_max_bytes,
                max_partition_fetch_bytes=s.max_partition_fetch_bytes,
                group_instance_id=s.group_instance_id,
                **config,
            )
        except KafkaError as exc:
            if is_refusal(exc):
                raise refused(self.uri, exc) from exc
            raise BrokersUnavailableError(f"{self.uri}: the brokers stopped answering ({exc})") from exc
        self._consumer = consumer
        self._holds = Holds()
        self._events = queue.SimpleQueue()  # news from an abandoned consumer's listener is not ours
        self.metrics.up.set(1)
        commit_checkpoint_ahead(consumer, self._resume)
        # Join with the topics' metadata at hand: a first join without it assigns nothing and
        # forces an immediate rejoin, a path on which kafka-python 3.0 was seen to stall.
        for topic in self.topics:
            if not consumer.partitions_for_topic(topic):
                log.warning("topic %s does not exist (yet); waiting for it to appear", topic)
        if self.partitions is not None:
            consumer.assign([TopicPartition(t, p) for t in self.topics for p in sorted(self.partitions)])
            if self._paused:
                consumer.pause(*consumer.assignment())
            log.info("consuming partition(s) %s of %s", ",".join(map(str, sorted(self.partitions))), self.topics[0])
            return
        consumer.subscribe(self.topics, listener=_Listener(self, self._events))
        log.info("consuming %s as group %s from %s", ",".join(self.topics), self.group, ",".join(self.servers))

    def close(self) -> None:
        if self._consumer is None:
            return
        try:
            self._offsets.run(self._consumer, self._events, self.may_commit, final=True)
        finally:  # whatever the last commit did, the sockets are released
            self._consumer.close(autocommit=False)
            self._consumer = None

    def _require(self) -> KafkaConsumer:
        if self._consumer is None:
            raise SourceError(f"{self.uri}: used before open")
        return self._consumer

    # -- polling thread ------------------------------------------------------------------

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        if self._consumer is None and not (time.monotonic() >= self._reconnect_at and self._try_connect()):
            time.sleep(timeout_s)  # waiting for the brokers: nothing to hand out
            return []
        self._apply_events()
        self._rejoin_if_stalled()
        consumer = self._require()
        self._offsets.run(consumer, self._events, self.may_commit, final=False)
        self._measure_lag()
        self._holds.release_due(consumer, self._paused)
        # With every partition paused, poll only keeps the membership alive and returns nothing.
        try:
            batches = consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max(1, max_records))
        except Exception as exc:  # only what names its partition is held; the rest is re-raised
            batches = {}
            self._hold(consumer, exc)
        self._apply_events()  # the listener runs during poll: its news is applied before the caller asks
        out: list[Record] = []
        for tp, messages in batches.items():
            stream = stream_of(tp)
            out.extend(Record(m.value or b"", stream, m.offset + 1, m.key, headers=m.headers or None) for m in messages)
            if messages:
                self._read[tp] = messages[-1].offset + 1
                tries = self._holds.read(tp)
                if tries:
                    log.warning("%s reads again after %d unreadable fetch(es)", stream, tries)
            self.metrics.records.labels(tp.topic).inc(len(messages))
        return out

    def _hold(self, consumer: KafkaConsumer, exc: Exception) -> None:
        """Hold the partition whose fetched records cannot be read; nothing of it is skipped.

        An error that names no partition is not about a record; one of a codec this install lacks
        would fail every batch of that codec: both stop the intake as before.
        """
        tp = partition_of(exc)
        if tp is None:
            raise exc
        if isinstance(exc, UnsupportedCodecError):
            raise SourceError(f"{stream_of(tp)}: a batch this install cannot decompress: {exc}") from exc
        if tp not in consumer.assignment():  # revoked meanwhile: its new owner reads it
            return
        wait_s, tries = self._holds.hold(consumer, tp)
        self.metrics.unreadable.labels(tp.topic, str(tp.partition)).inc()
        if tries == 1:  # said once until it reads again; the counter counts every try
            log.error(
                "%s: kafka-python cannot read the records it fetched (%s: %s); nothing is skipped: the "
                "partition is held and read again after %.0f s, then with doubling waits up to %.0f s. A batch "
                "damaged in the broker's log stays unreadable until a replica repairs it or the group's offset "
                "is moved past it with the daemon stopped",
                stream_of(tp),
                type(exc).__name__,
                exc,
                wait_s,
                HOLD_MAX_S,
            )

    def _rejoin_if_stalled(self) -> None:
        """Start a fresh consumer when a rebalance took this member's partitions and never ended.

        The known cause, a kafka-python 3.0 bug, is fixed in ``kafka_compat``; this is the last
        resort for any other way a join never ends. A rebalance waits at most
        max_poll_interval_ms for the slowest member, so past that (and a session) the join is
        stuck; a new consumer joins afresh from the committed offsets, which is at-least-once
        like any rebalance.
        """
        s = self.settings
        limit = (s.max_poll_interval_ms + s.session_timeout_ms) / 1000 + REJOIN_MARGIN_S
        if self._revoked_at is None or time.monotonic() - self._revoked_at < limit:
            return
        log.warning(
            "group %s: no partitions %.0f s after a rebalance; rejoining with a new consumer", self.group, limit
        )
        stuck = self._require()
        try:
            self._connect()  # the new member first: if the brokers are away, the stuck one stays until the next try
        except BrokersUnavailableError as exc:
            self._revoked_at = time.monotonic()
            log.warning("cannot start a new consumer (%s); next try in %.0f s", exc, limit)
            return
        self._revoked_at = None
        self._offsets.forget()
        self._read.clear()
        try:
            stuck.close(autocommit=False)
        except KafkaError as exc:
            log.warning("closing the stalled consumer: %s", exc)

    def pause(self) -> None:
        self._paused = True
        if self._consumer is not None:  # else nothing fetches yet; the first assignment is paused
            self._consumer.pause(*self._consumer.assignment())
            self.metrics.paused.set(len(set(self._consumer.paused()) - self._holds.held))

    def resume(self) -> None:
        self._paused = False
        if self._consumer is not None:  # a partition held for unreadable records waits out its hold
            self._consumer.resume(*(set(self._consumer.paused()) - self._holds.held))
        self.metrics.paused.set(0)

    def commit(self, positions: Positions) -> None:
        """Queue a commit; it runs on the polling thread at its next poll."""
        self._offsets.offer(positions)

    def _measure_lag(self) -> None:
        if time.monotonic() - self._lag_at < self.settings.lag_interval_s:
            return
        self._lag_at = time.monotonic()
        consumer = self._require()
        assigned = list(consumer.assignment())
        if not assigned:
            return
        # The lag query doubles as the outage probe: kafka-python reconnects by itself and says
        # little, so the outage and the recovery are logged here, once each.
        timeout_ms = int(min(self.settings.lag_interval_s, 5.0) * 1000)
        try:
            ends = consumer.end_offsets(assigned, timeout_ms=timeout_ms)
            self._offsets.read_committed(consumer, assigned, timeout_ms)
            self._ends = dict(ends)
            for tp in assigned:
                lag = max(0, ends[tp] - self._offsets.committed[tp])
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(lag)
        except KafkaError as exc:
            if self._down_since is None:
                self._down_since = time.monotonic()
                self.metrics.up.set(0)
                log.warning("kafka outage: the brokers do not answer (%s); serving goes on, reconnecting", exc)
            return
        if self._down_since is not None:
            log.warning("kafka is back after %.0f s; consuming again", time.monotonic() - self._down_since)
            self._down_since = None
        self.metrics.up.set(1)

    def at_end(self) -> bool:
        """Whether every assigned partition was read (or committed) up to its end offset at the
        last lag measurement: an empty poll alone may be a fetch still under way."""
        consumer = self._consumer
        unreadable = self._holds.unreadable  # read when repaired
        assigned = [tp for tp in consumer.assignment() if tp not in unreadable] if consumer is not None else []
        return bool(assigned) and all(
            tp in self._ends and max(self._read.get(tp, 0), self._offsets.committed.get(tp, 0)) >= self._ends[tp]
            for tp in assigned
        )

    def take_revoked(self) -> set[str]:
        """Streams gone to other members since the last call (the intake calls it after ``poll``)."""
        revoked, self._revoked = self._revoked, set()
        return revoked

    def _apply_events(self) -> None:
        """Apply what the IO thread reported since the last poll, in the order it happened."""
        while True:
            try:
                kind, data = self._events.get_nowait()
            except queue.Empty:
                return
            if kind == "revoked":
                self._on_revoked(data)
            elif kind == "assigned":
                self._on_assigned(data)
            else:
                committed, failed = data
                self._offsets.on_committed(committed, failed, self._revoking)

    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        for tp in revoked:
            self._offsets.committed.pop(tp, None)
            # Unknown, not 0: a 0 read as "drained" until the next measurement after reassignment.
            with contextlib.suppress(KeyError):  # never measured here
                self.metrics.lag.remove(tp.topic, str(tp.partition))
        self._revoking.update(revoked)  # which of them are really gone shows at the assignment
        self._revoked_at = time.monotonic()
        self.metrics.rebalances.inc()
        log.info("partitions revoked: %s", ", ".join(sorted(stream_of(tp) for tp in revoked)))

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        self._revoked_at = None
        gone = self._revoking - assigned
        self._revoking.clear()
        self._revoked.update(stream_of(tp) for tp in gone)
        self._revoked.difference_update(stream_of(tp) for tp in assigned)
        if self._paused and self._consumer is not None:
            self._consumer.pause(*assigned)  # still under backpressure: new partitions wait too
        log.info("partitions assigned: %s", ", ".join(sorted(stream_of(tp) for tp in assigned)) or "none")


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Runs on kafka-python's IO thread: commits what is checkpointed for revoked partitions
    (a blocking commit is not allowed there) and queues the change for the polling thread."""

    def __init__(self, source: KafkaSource, events: queue.SimpleQueue[News]) -> None:
        self.source = source
        self.events = events

    def on_partitions_revoked(self, revoked: Any) -> None:
        revoked = set(revoked)
        if not revoked:  # the eager protocol revokes nothing before the first join
            return
        uncommitted = self.source._offsets.uncommitted  # an immutable snapshot: see the module docstring
        offsets = {tp: OffsetAndMetadata(uncommitted[tp], "", -1) for tp in revoked if tp in uncommitted}
        consumer = self.source._consumer
        if offsets and consumer is not None and self.source.may_commit():
            consumer.commit_async(offsets)
        self.events.put(("revoked", revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.events.put(("assigned", set(assigned)))
