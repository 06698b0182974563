"""The rebalance listener hands its news to the polling thread instead of changing shared state.

No broker: the listener's callbacks are called from a thread of the test's own, as kafka-python's
IO thread calls them, on a source that has not connected.
"""

from __future__ import annotations

import threading

from kafka import TopicPartition
from prometheus_client import CollectorRegistry

from dynft.metrics import KafkaMetrics
from dynft.settings import KafkaSettings
from dynft.sources.kafka import KafkaSource, _Listener


def on_io_thread(action: object) -> None:
    thread = threading.Thread(target=action)  # type: ignore[arg-type]
    thread.start()
    thread.join(10)


def test_a_revocation_changes_nothing_until_the_polling_thread_applies_it() -> None:
    source = KafkaSource("kafka://127.0.0.1:1/t", KafkaSettings(), KafkaMetrics(CollectorRegistry()))
    kept, moved = TopicPartition("t", 0), TopicPartition("t", 1)
    source._offsets.committed = {kept: 5, moved: 7}  # what _measure_lag reads on the polling thread
    listener = _Listener(source, source._events)

    on_io_thread(lambda: listener.on_partitions_revoked([kept, moved]))
    assert source._offsets.committed == {kept: 5, moved: 7}, "the IO thread changed the polling thread's state"
    assert source.take_revoked() == set()

    source._apply_events()  # the polling thread, at its next poll
    assert source._offsets.committed == {}
    assert source._revoked_at is not None

    on_io_thread(lambda: listener.on_partitions_assigned([kept]))
    assert source.take_revoked() == set(), "the assignment was applied before the polling thread asked"
    source._apply_events()
    assert source.take_revoked() == {"t/1"}  # t/0 came back: its queued records stay
    assert source._revoked_at is None


def test_the_revocation_commit_reads_the_snapshot_the_polling_thread_published() -> None:
    """What the listener would commit for a revoked partition is the published snapshot of
    checkpointed-but-uncommitted offsets, not the live dictionaries."""
    source = KafkaSource("kafka://127.0.0.1:1/t", KafkaSettings(), KafkaMetrics(CollectorRegistry()))
    tp = TopicPartition("t", 0)
    source._offsets.committed = {tp: 30}
    snapshot_before = source._offsets.uncommitted
    assert snapshot_before == {}
    source._offsets.checkpointed[tp] = 40
    source._offsets.publish_uncommitted()
    assert source._offsets.uncommitted == {tp: 40}
    assert snapshot_before == {}, "a published snapshot was mutated instead of replaced"
    source._offsets.committed[tp] = 40
    source._offsets.publish_uncommitted()
    assert source._offsets.uncommitted == {}


def test_a_commit_that_lands_after_its_partition_was_revoked_is_not_remembered() -> None:
    """The next owner may commit further; what the group committed is read afresh on reassignment."""
    source = KafkaSource("kafka://127.0.0.1:1/t", KafkaSettings(), KafkaMetrics(CollectorRegistry()))
    revoked, kept = TopicPartition("t", 0), TopicPartition("t", 1)
    source._offsets.committed = {revoked: 10, kept: 10}
    source._offsets.inflight = {revoked: 20, kept: 20}
    listener = _Listener(source, source._events)
    on_io_thread(lambda: listener.on_partitions_revoked([revoked]))
    on_io_thread(lambda: source._events.put(("committed", ({revoked: 20, kept: 20}, None))))
    source._apply_events()
    assert source._offsets.committed == {kept: 20}
    assert source._offsets.inflight == {}
