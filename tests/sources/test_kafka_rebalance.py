"""Records queued in the intake across a rebalance, against the real broker.

kafka-python 3.0 (eager protocol) tells the listener that every partition is revoked when a
rebalance starts, but a partition the member gets back keeps its fetch position. Queued
records of such a partition must therefore stay queued: dropping them would skip them for
good, since nobody fetches them again. Queued records of a partition that went to another
member are dropped, and that member reads them again from the committed offset.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from prometheus_client import CollectorRegistry

from dynft.devbroker import Broker
from dynft.metrics import KafkaMetrics
from dynft.settings import KafkaSettings
from dynft.sources.base import Intake
from dynft.sources.kafka import KafkaSource
from dynft.sources.kafka_compat import apply_join_fixes

from kafka_helpers import new_topic, publish, wait_until


def rows(prefix: str, n: int) -> list[dict[str, str]]:
    return [{"id": f"{prefix}{i}", "text": f"w{i}", "label": "a"} for i in range(n)]


def test_a_partition_given_back_after_a_rebalance_keeps_its_queued_records(
    kafka_broker: Broker, tmp_path: Path
) -> None:
    topic, other = new_topic(kafka_broker, partitions=1), new_topic(kafka_broker, partitions=1)
    first, later = rows("q", 300), rows("l", 50)
    publish(kafka_broker, topic, first, tmp_path)
    metrics = KafkaMetrics(CollectorRegistry())
    settings = KafkaSettings(session_timeout_ms=6000, lag_interval_s=0.5)
    source = KafkaSource(f"kafka://{kafka_broker.bootstrap}/{topic}?group=back", settings, metrics)
    intake = Intake(source, max_queued=1000)
    intake.start()
    joiner = None
    try:
        wait_until(lambda: intake.queued == len(first), 60, "the first records to be queued")
        rebalances = metrics.rebalances._value.get()
        # A member subscribed to another topic joins the group: everyone rejoins, and the
        # range assignor hands this member its only partition back.
        joiner = KafkaConsumer(other, bootstrap_servers=kafka_broker.bootstrap, group_id="back")
        deadline = time.monotonic() + 60
        while not joiner.assignment() and time.monotonic() < deadline:
            joiner.poll(timeout_ms=200)
        assert joiner.assignment(), "the second member never joined"
        wait_until(lambda: metrics.rebalances._value.get() > rebalances, 60, "the rebalance to reach the source")
        # The other member keeps polling, as a live member does: the leader may start one more
        # rebalance once it has the other topic's metadata, and that one needs both members.
        deadline = time.monotonic() + 60
        while source._revoked_at is not None:
            assert time.monotonic() < deadline, "timed out waiting for the partition to come back"
            joiner.poll(timeout_ms=200)
        publish(kafka_broker, topic, later, tmp_path)
        taken: list[str] = []
        deadline = time.monotonic() + 60
        while len(set(taken)) < len(first) + len(later) and time.monotonic() < deadline:
            taken += [json.loads(r.raw)["id"] for r in intake.take(100, 0.5)]
            joiner.poll(timeout_ms=0)  # keep the other member alive
        missing = {r["id"] for r in first + later} - set(taken)
        assert not missing, f"{len(missing)} record(s) never delivered, e.g. {sorted(missing)[:5]}"
    finally:
        if joiner is not None:
            joiner.close(autocommit=False)
        intake.stop()


class Recorder(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.assigned: list[set[TopicPartition]] = []
        self.revoked = 0

    def on_partitions_revoked(self, revoked: object) -> None:
        self.revoked += 1

    def on_partitions_assigned(self, assigned: object) -> None:
        self.assigned.append(set(assigned))  # type: ignore[call-overload]


def settle(
    leader: KafkaConsumer, follower: KafkaConsumer, lead: Recorder, follow: Recorder, split: set[TopicPartition]
) -> None:
    """Poll both members until they share ``split`` and ten rounds in a row change nothing."""
    deadline, quiet = time.monotonic() + 60, 0
    while quiet < 10:
        assert time.monotonic() < deadline, f"the group never settled on {sorted(split)}"
        counts = (len(lead.assigned), len(follow.assigned), lead.revoked, follow.revoked)
        follower.poll(timeout_ms=100)
        leader.poll(timeout_ms=100)
        shared = bool(lead.assigned and follow.assigned) and lead.assigned[-1] | follow.assigned[-1] == split
        changed = counts != (len(lead.assigned), len(follow.assigned), lead.revoked, follow.revoked)
        quiet = quiet + 1 if shared and not changed else 0


def test_a_join_that_finishes_between_two_polls_is_applied_not_started_again(kafka_broker: Broker) -> None:
    """kafka-python 3.0 threw away a join that finished between polls; a leader's rejoin then rebalanced again."""
    assert apply_join_fixes()
    many, one = new_topic(kafka_broker, partitions=2), new_topic(kafka_broker, partitions=1)
    group = f"slow-{many}"

    def member(topics: list[str], listener: Recorder) -> KafkaConsumer:
        consumer = KafkaConsumer(bootstrap_servers=kafka_broker.bootstrap, group_id=group, enable_auto_commit=False)
        consumer.subscribe(topics, listener=listener)
        return consumer

    lead, follow = Recorder(), Recorder()
    leader = member([many, one], lead)  # first in: it leads
    follower = None
    try:
        deadline = time.monotonic() + 60
        while not lead.assigned:
            assert time.monotonic() < deadline, "the leader never joined"
            leader.poll(timeout_ms=200)
        follower = member([many], follow)
        settle(leader, follower, lead, follow, {TopicPartition(t, p) for t, p in ((many, 0), (many, 1), (one, 0))})

        # The leader's new subscription makes it rejoin at once, but the join waits for the
        # follower, which is not polling: every leader poll gives up with the join in flight.
        leader.subscribe([many], listener=lead)
        assigned, revoked = len(lead.assigned), lead.revoked
        for _ in range(10):
            leader.poll(timeout_ms=100)
        assert lead.revoked == revoked + 1 and len(lead.assigned) == assigned, "the leader's join did not wait"
        # The follower rejoins; the leader's join (assignment, SyncGroup) ends in the background.
        followed, deadline = len(follow.assigned), time.monotonic() + 60
        while len(follow.assigned) == followed:
            assert time.monotonic() < deadline, "the follower never rejoined"
            follower.poll(timeout_ms=200)
        time.sleep(1.0)

        leader.poll(timeout_ms=100)
        assert len(lead.assigned) == assigned + 1, "the finished join was not applied at the next poll"
        # The leader assigned from metadata that still had the dropped topic: one more
        # rebalance follows (kafka-python's own check), and the group settles.
        settle(leader, follower, lead, follow, {TopicPartition(many, 0), TopicPartition(many, 1)})
    finally:
        if follower is not None:
            follower.close(autocommit=False)
        leader.close(autocommit=False)
