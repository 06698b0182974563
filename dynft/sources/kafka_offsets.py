"""The offsets a Kafka source commits: checkpointed, committed by the group, in flight.

Owned by the source's polling thread (``dynft.sources.kafka``), with two exceptions: ``offer``
may be called from any thread (the training loop's, after a checkpoint: a queue), and
``uncommitted`` is read by kafka-python's IO thread for the revocation commit: the polling thread
replaces it whole and never mutates it, so a read sees one consistent version.

Commits are asynchronous: a synchronous commit that meets a rebalance waits for the rejoin, and
the rejoin waits for the next poll, which the polling thread would never make. A commit never
moves the group back: the group's offset of a partition new to this member is read first,
since another member may have committed past our old checkpoint while it owned the partition.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Iterable
from typing import Any

from kafka import KafkaConsumer, OffsetAndMetadata, TopicPartition
from kafka.errors import KafkaError

from dynft.metrics import KafkaMetrics
from dynft.sources.base import Positions
from dynft.sources.kafka_connect import partition_of

log = logging.getLogger(__name__)
COMMIT_RETRY_S = 1.0  # pause after a failed offset commit (seen: hundreds a second during a rebalance)

# What the IO thread hands the polling thread: ("revoked" | "assigned", partitions) from the
# rebalance listener, ("committed", (offsets, failure)) from an asynchronous commit.
News = tuple[str, Any]


class Offsets:
    def __init__(self, metrics: KafkaMetrics) -> None:
        self.metrics = metrics
        self._offered: queue.Queue[Positions] = queue.Queue()  # from the training loop's thread
        self.committed: dict[TopicPartition, int] = {}  # the group's, as read or as committed by us
        self.checkpointed: dict[TopicPartition, int] = {}  # durable, maybe not yet committed
        self.inflight: dict[TopicPartition, int] = {}  # asynchronous commits under way
        self.retry_at = 0.0  # after a failed commit, the next waits until then
        self.uncommitted: dict[TopicPartition, int] = {}  # read by the IO thread: replaced whole

    def offer(self, positions: Positions) -> None:
        """Positions inside a durable checkpoint, from any thread; committed at the next ``run``."""
        self._offered.put(dict(positions))

    def forget(self) -> None:
        """A new consumer (a rejoin): what the group has is read afresh, earlier commits' news is not ours."""
        self.committed.clear()
        self.inflight.clear()

    def run(
        self, consumer: KafkaConsumer, news: queue.SimpleQueue[News], may_commit: Callable[[], bool], final: bool
    ) -> None:
        """Commit checkpointed positions not yet committed, for the partitions this member owns
        (``final``: synchronously, at close)."""
        self._take_offered()
        self.publish_uncommitted()
        if not may_commit():
            return
        if not final and time.monotonic() < self.retry_at:
            return  # a commit just failed (a rebalance, an outage): retrying at every poll only floods the group
        owned = consumer.assignment()
        try:
            self.read_committed(consumer, owned & self.checkpointed.keys(), timeout_ms=5_000)
        except KafkaError as exc:
            log.warning("cannot read the group's committed offsets (%s); their commits wait", exc)
        offsets = {
            tp: OffsetAndMetadata(o, "", -1)
            for tp, o in self.checkpointed.items()
            if tp in owned and tp in self.committed and o > max(self.committed[tp], self.inflight.get(tp, -1))
        }
        if not offsets:
            return
        if final:
            try:
                consumer.commit(offsets, timeout_ms=10_000)
                self.committed.update({tp: om.offset for tp, om in offsets.items()})
            except KafkaError as exc:
                log.warning("final commit failed (the next owner re-reads from the last commit): %s", exc)
            return
        self.inflight.update({tp: om.offset for tp, om in offsets.items()})
        started = time.perf_counter()

        def done(committed: Any, response: Any) -> None:  # on kafka-python's IO thread: news only
            failed = response if isinstance(response, Exception) else None
            if failed is None:
                self.metrics.commit_seconds.observe(time.perf_counter() - started)
            news.put(("committed", ({tp: om.offset for tp, om in committed.items()}, failed)))

        consumer.commit_async(offsets, callback=done)

    def _take_offered(self) -> None:
        while True:
            try:
                positions = self._offered.get_nowait()
            except queue.Empty:
                return
            for stream, offset in positions.items():
                tp = partition_of(stream)
                self.checkpointed[tp] = max(offset, self.checkpointed.get(tp, -1))

    def publish_uncommitted(self) -> None:
        """Hand the IO thread's revocation commit a fresh snapshot of what awaits a commit."""
        self.uncommitted = {tp: o for tp, o in self.checkpointed.items() if o > self.committed.get(tp, -1)}

    def read_committed(self, consumer: KafkaConsumer, partitions: Iterable[TopicPartition], timeout_ms: int) -> None:
        """Learn the group's committed offset of partitions new to this member; KafkaError on failure."""
        for tp in partitions:
            if tp not in self.committed:
                self.committed[tp] = consumer.committed(tp, timeout_ms=timeout_ms) or 0

    def on_committed(
        self, committed: dict[TopicPartition, int], failed: Exception | None, revoking: set[TopicPartition]
    ) -> None:
        """An asynchronous commit's outcome, applied on the polling thread."""
        for tp, offset in committed.items():
            if self.inflight.get(tp) == offset:
                del self.inflight[tp]
        if failed is not None:
            self.retry_at = time.monotonic() + COMMIT_RETRY_S
            log.warning("offset commit failed, retried in %.0f s: %s", COMMIT_RETRY_S, failed)
            return
        for tp, offset in committed.items():
            if tp not in revoking:  # revoked meanwhile: its next owner's commits are read afresh
                self.committed[tp] = max(offset, self.committed.get(tp, -1))
