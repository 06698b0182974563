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
- After a restart, positions from the checkpoint that are ahead of the group's committed
  offsets (a crash between checkpoint and commit) are committed before joining.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kafka import ConsumerRebalanceListener, KafkaConsumer, OffsetAndMetadata, TopicPartition
from kafka.errors import KafkaError

from dynft.errors import SourceError
from dynft.metrics import KafkaMetrics
from dynft.settings import KafkaSettings
from dynft.sources.base import Positions, Record, Source
from dynft.sources.kafka_compat import apply_join_fixes

log = logging.getLogger(__name__)
COMMIT_RETRY_S = 1.0  # pause after a failed offset commit (seen: hundreds a second during a rebalance)
REJOIN_MARGIN_S = 10.0  # beyond the longest legitimate rebalance before a join counts as stuck


def parse_kafka_uri(uri: str, default_group: str) -> tuple[list[str], list[str], str]:
    """``kafka://h1:9092,h2:9092/t1,t2?group=g`` -> (bootstrap servers, topics, group)."""
    parts = urlsplit(uri)
    servers = [s for s in parts.netloc.split(",") if s]
    topics = [t for t in parts.path.lstrip("/").split(",") if t]
    if parts.scheme != "kafka" or not servers or not topics:
        raise SourceError(f"bad Kafka source {uri!r}: expected kafka://HOST:PORT/TOPIC[,TOPIC]?group=GROUP")
    for server in servers:
        host, _, port = server.rpartition(":")
        if not host or not port.isdigit():
            raise SourceError(f"bad Kafka source {uri!r}: {server!r} is not HOST:PORT")
    query = parse_qs(parts.query)
    unknown = set(query) - {"group"}
    if unknown:
        raise SourceError(f"bad Kafka source {uri!r}: unknown parameter(s) {sorted(unknown)}; only group")
    group = query.get("group", [default_group])[0]
    return servers, topics, group


def stream_of(tp: TopicPartition) -> str:
    return f"{tp.topic}/{tp.partition}"


def partition_of(stream: str) -> TopicPartition:
    topic, _, partition = stream.rpartition("/")
    return TopicPartition(topic, int(partition))


def client_config(settings: KafkaSettings) -> dict[str, Any]:
    """Security and identity options shared by consumer, producer and admin client."""
    config: dict[str, Any] = {"client_id": settings.client_id, "security_protocol": settings.security_protocol}
    if settings.sasl_mechanism:
        config["sasl_mechanism"] = settings.sasl_mechanism
        config["sasl_plain_username"] = settings.sasl_username
        if settings.sasl_password is not None:
            config["sasl_plain_password"] = settings.sasl_password.get_secret_value()
    for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        value = getattr(settings, key)
        if value is not None:
            config[key] = str(value)
    return config


class KafkaSource(Source):
    def __init__(self, uri: str, settings: KafkaSettings, metrics: KafkaMetrics) -> None:
        self.uri = uri
        self.servers, self.topics, self.group = parse_kafka_uri(uri, settings.group)
        self.settings = settings
        self.metrics = metrics
        self._consumer: KafkaConsumer | None = None
        self._commits: queue.Queue[Positions] = queue.Queue()
        self._committed: dict[TopicPartition, int] = {}
        self._checkpointed: dict[TopicPartition, int] = {}  # durable, maybe not yet committed
        self._inflight: dict[TopicPartition, int] = {}  # asynchronous commits under way
        self._commit_retry_at = 0.0  # after a failed commit, the next waits until then
        self._revoked_at: float | None = None  # a rebalance took partitions and none came back yet
        self._revoking: set[TopicPartition] = set()  # revoked by a rebalance that has not assigned yet
        self._revoked: set[str] = set()  # went to other members: the intake drops their queued records
        self._revoked_lock = threading.Lock()
        self._resume: Positions = {}
        self._lag_at = 0.0
        self._down_since: float | None = None  # monotonic time the brokers stopped answering

    # -- lifecycle -----------------------------------------------------------------------

    def resume_from(self, positions: Positions) -> None:
        self._resume = {k: v for k, v in positions.items() if k.rpartition("/")[0] in self.topics}

    def open(self) -> None:
        apply_join_fixes()
        s = self.settings
        try:
            consumer = KafkaConsumer(
                bootstrap_servers=self.servers,
                group_id=self.group,
                enable_auto_commit=False,
                auto_offset_reset=s.auto_offset_reset,
                max_poll_records=s.max_poll_records,
                max_poll_interval_ms=s.max_poll_interval_ms,
                session_timeout_ms=s.session_timeout_ms,
                fetch_max_bytes=s.fetch_max_bytes,
                max_partition_fetch_bytes=s.max_partition_fetch_bytes,
                group_instance_id=s.group_instance_id,
                **client_config(s),
            )
        except KafkaError as exc:
            raise SourceError(f"{self.uri}: cannot reach the brokers ({exc})") from exc
        self._consumer = consumer
        self.metrics.up.set(1)
        self._commit_checkpoint_ahead()
        # Join with the topics' metadata at hand: a first join without it assigns nothing and
        # forces an immediate rejoin, a path on which kafka-python 3.0 was seen to stall.
        for topic in self.topics:
            if not consumer.partitions_for_topic(topic):
                log.warning("topic %s does not exist (yet); waiting for it to appear", topic)
        consumer.subscribe(self.topics, listener=_Listener(self))
        log.info("consuming %s as group %s from %s", ",".join(self.topics), self.group, ",".join(self.servers))

    def _commit_checkpoint_ahead(self) -> None:
        """Commit checkpointed positions the group has not committed (a crash came in between)."""
        consumer = self._require()
        ahead = {}
        for stream, offset in self._resume.items():
            tp = partition_of(stream)
            try:
                committed = consumer.committed(tp)
            except KafkaError as exc:
                log.warning("cannot read the committed offset of %s: %s", stream, exc)
                continue
            if committed is None or committed < offset:
                ahead[tp] = OffsetAndMetadata(offset, "", -1)
        if not ahead:
            return
        try:
            consumer.commit(ahead)
            log.info("committed %d checkpointed position(s) the group was missing", len(ahead))
        except KafkaError as exc:  # the group is active elsewhere: its members own those partitions now
            log.warning("could not commit checkpointed positions before joining: %s", exc)

    def close(self) -> None:
        if self._consumer is None:
            return
        try:
            self._run_commits(final=True)
        finally:  # whatever the last commit did, the sockets are released
            self._consumer.close(autocommit=False)
            self._consumer = None

    def _require(self) -> KafkaConsumer:
        if self._consumer is None:
            raise SourceError(f"{self.uri}: used before open")
        return self._consumer

    # -- polling thread ------------------------------------------------------------------

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        self._rejoin_if_stalled()
        consumer = self._require()
        self._run_commits()
        self._measure_lag()
        # With every partition paused, poll only keeps the membership alive and returns nothing.
        batches = consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max(1, max_records))
        out: list[Record] = []
        for tp, messages in batches.items():
            stream = stream_of(tp)
            out.extend(Record(m.value or b"", stream, m.offset + 1, m.key) for m in messages)
            self.metrics.records.labels(tp.topic).inc(len(messages))
        return out

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
            self.open()  # the new member first: if the brokers are away, the stuck one stays until the next try
        except SourceError as exc:
            self._revoked_at = time.monotonic()
            log.warning("cannot start a new consumer (%s); next try in %.0f s", exc, limit)
            return
        self._revoked_at = None
        self._committed.clear()
        self._inflight.clear()
        try:
            stuck.close(autocommit=False)
        except KafkaError as exc:
            log.warning("closing the stalled consumer: %s", exc)

    def pause(self) -> None:
        consumer = self._require()
        consumer.pause(*consumer.assignment())
        self.metrics.paused.set(len(consumer.paused()))

    def resume(self) -> None:
        consumer = self._require()
        consumer.resume(*consumer.paused())
        self.metrics.paused.set(0)

    def commit(self, positions: Positions) -> None:
        """Queue a commit; it runs on the polling thread at its next poll."""
        self._commits.put(dict(positions))

    def _run_commits(self, final: bool = False) -> None:
        """Commit checkpointed positions not yet committed, for the partitions this member owns.

        Asynchronous: a synchronous commit that meets a rebalance waits for the rejoin, and the
        rejoin waits for the next poll, which this thread would never make.
        """
        while True:
            try:
                positions = self._commits.get_nowait()
            except queue.Empty:
                break
            for stream, offset in positions.items():
                tp = partition_of(stream)
                self._checkpointed[tp] = max(offset, self._checkpointed.get(tp, -1))
        if not final and time.monotonic() < self._commit_retry_at:
            return  # a commit just failed (a rebalance, an outage): retrying at every poll only floods the group
        consumer = self._require()
        owned = consumer.assignment()
        try:
            self._read_committed(owned & self._checkpointed.keys(), timeout_ms=5_000)
        except KafkaError as exc:
            log.warning("cannot read the group's committed offsets (%s); their commits wait", exc)
        offsets = {
            tp: OffsetAndMetadata(o, "", -1)
            for tp, o in self._checkpointed.items()
            if tp in owned and tp in self._committed and o > max(self._committed[tp], self._inflight.get(tp, -1))
        }
        if not offsets:
            return
        if final:
            try:
                consumer.commit(offsets, timeout_ms=10_000)
                self._committed.update({tp: om.offset for tp, om in offsets.items()})
            except KafkaError as exc:
                log.warning("final commit failed (the next owner re-reads from the last commit): %s", exc)
            return
        self._inflight.update({tp: om.offset for tp, om in offsets.items()})
        started = time.perf_counter()

        def done(committed: Any, response: Any) -> None:  # on kafka-python's IO thread
            for tp, om in committed.items():
                if self._inflight.get(tp) == om.offset:
                    del self._inflight[tp]
            if isinstance(response, Exception):
                self._commit_retry_at = time.monotonic() + COMMIT_RETRY_S
                log.warning("offset commit failed, retried in %.0f s: %s", COMMIT_RETRY_S, response)
                return
            self.metrics.commit_seconds.observe(time.perf_counter() - started)
            for tp, om in committed.items():
                self._committed[tp] = max(om.offset, self._committed.get(tp, -1))

        consumer.commit_async(offsets, callback=done)

    def _read_committed(self, partitions: Iterable[TopicPartition], timeout_ms: int) -> None:
        """Learn the group's committed offset of partitions new to this member; KafkaError on failure.

        Another member may have committed past our old checkpoint while it owned one, and a
        commit must never move the group back.
        """
        consumer = self._require()
        for tp in partitions:
            if tp not in self._committed:
                self._committed[tp] = consumer.committed(tp, timeout_ms=timeout_ms) or 0

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
            self._read_committed(assigned, timeout_ms)
            for tp in assigned:
                lag = max(0, ends[tp] - self._committed[tp])
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

    def take_revoked(self) -> set[str]:
        with self._revoked_lock:
            revoked, self._revoked = self._revoked, set()
        return revoked

    # -- rebalance listener (kafka-python's IO thread) -------------------------------------

    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        if not revoked:  # the eager protocol revokes nothing before the first join
            return
        consumer = self._require()
        offsets = {
            tp: OffsetAndMetadata(self._checkpointed[tp], "", -1)
            for tp in revoked
            if self._checkpointed.get(tp, -1) > self._committed.get(tp, -1)
        }
        if offsets:
            consumer.commit_async(offsets)  # a blocking commit is not allowed here
        for tp in revoked:
            self._committed.pop(tp, None)
            self.metrics.lag.labels(tp.topic, str(tp.partition)).set(0)
        with self._revoked_lock:
            self._revoking.update(revoked)  # which of them are really gone shows at the assignment
        self._revoked_at = time.monotonic()
        self.metrics.rebalances.inc()
        log.info("partitions revoked: %s", ", ".join(sorted(stream_of(tp) for tp in revoked)))

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        self._revoked_at = None
        with self._revoked_lock:
            gone = self._revoking - assigned
            self._revoking.clear()
            self._revoked.update(stream_of(tp) for tp in gone)
            self._revoked.difference_update(stream_of(tp) for tp in assigned)
        if self._consumer is not None and self._consumer.paused():
            self._consumer.pause(*assigned)  # still under backpressure: new partitions wait too
        log.info("partitions assigned: %s", ", ".join(sorted(stream_of(tp) for tp in assigned)) or "none")


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: KafkaSource) -> None:
        self.source = source

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.source._on_revoked(set(revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.source._on_assigned(set(assigned))
