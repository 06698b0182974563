"""Trainer failover through Kafka: two ``dynft train`` processes, one active, a real broker.

Nothing is shared but the broker: each trainer has its own state directory. The standby takes
over when the active one dies (kill -9) or is paused past its session (SIGSTOP), resumes from
the newest version on the versions topic, and the paused one, resumed, publishes nothing more.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from dynft.devbroker import Broker
from dynft.replication.follower import Follower
from dynft.replication.following import FollowingRegistry
from dynft.replication.records import decode_pointer, decode_version, pointer_topic
from dynft.settings import Settings
from dynft.term import term_topic

from helpers import keyword_events
from kafka_helpers import (
    ElectedTrainers,
    accounted,
    all_accounted,
    end_offsets,
    publish,
    topic_records,
    wait_until,
)

pytestmark = pytest.mark.slow
LABELS = ["alpha", "beta", "gamma"]
SESSION_S = 6.0  # kafka.session_timeout_ms of trainer_process
TAKEOVER_MARGIN_S = 60.0  # the rebalance, the term record and the versions topics read, on a loaded 2-core host


def terms(bootstrap: str, versions: str) -> list[dict[str, Any]]:
    """The term records (epoch, holder) in order; the holder ends with its pid."""
    return [json.loads(r.value) for r in topic_records(bootstrap, term_topic(versions))]


def holder_pid(term: dict[str, Any]) -> int:
    return int(str(term["holder"]).rpartition(":")[2])


def epochs_in_order(bootstrap: str, versions: str) -> list[tuple[str, int]]:
    """(kind, epoch) of every record on the versions and pointer topics, each topic in its order."""
    out = [
        ("version", decode_version(r.value).epoch) for r in topic_records(bootstrap, versions) if r.value is not None
    ]
    out += [("pointer", decode_pointer(r.value).epoch) for r in topic_records(bootstrap, pointer_topic(versions))]
    return out


class Pair(ElectedTrainers):
    """Two trainers of one configuration; ``start`` returns once the first holds the term."""

    def __init__(self, broker: Broker, settings: Settings, root: Path, partitions: int = 2) -> None:
        extra = ("registry.publish_every_steps=5", "registry.publish_interval_s=2", "model.max_length=32")
        super().__init__(broker, settings, root, partitions, *extra)

    def start(self) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
        first = self.spawn(0)
        wait_until(lambda: self.alive(0) and self.holders() == [first.pid], 240, "the first trainer to hold the term")
        second = self.spawn(1)
        standing_by = lambda: self.alive(1) and "standing by" in (self.root / "b.log").read_text()  # noqa: E731
        wait_until(standing_by, 240, "the second trainer to stand by")
        return first, second

    def alive(self, i: int) -> bool:
        assert self.procs[i].poll() is None, f"trainer {'ab'[i]} exited: {self.log(i)}"
        return True

    def holders(self) -> list[int]:
        return [holder_pid(t) for t in terms(self.broker.bootstrap, self.versions)]

    def newest_on_topic(self) -> int:
        found = [
            decode_version(r.value).version for r in topic_records(self.broker.bootstrap, self.versions) if r.value
        ]
        return max(found, default=0)


@pytest.fixture
def pair(kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path) -> Iterator[Pair]:
    made = Pair(kafka_broker, tiny_settings, tmp_path)
    try:
        yield made
    finally:
        made.stop_all()


def test_the_standby_takes_over_a_killed_trainer_from_its_newest_published_version(pair: Pair, tmp_path: Path) -> None:
    first, second = keyword_events(400, LABELS, seed=31), keyword_events(400, LABELS, seed=32, prefix="s")
    ids = [e["id"] for e in first + second]
    active, standby = pair.start()
    publish(pair.broker, pair.topic, first, tmp_path)
    wait_until(lambda: pair.newest_on_topic() >= 2, 240, "the active trainer to publish")
    # Committed once, so that the standby has events before the group's offsets to warm up from (a
    # loaded machine can publish twice before the first checkpoint's commit).
    committed = lambda: any(end_offsets(pair.broker, pair.topic, pair.group)[1].values())  # noqa: E731
    wait_until(committed, 120, "the active trainer's first commit")
    active.kill()  # kill -9: no shutdown, no last publish, no last commit
    active.wait()
    killed_at = time.monotonic()
    newest = pair.newest_on_topic()
    publish(pair.broker, pair.topic, second, tmp_path)
    wait_until(lambda: pair.holders()[-1:] == [standby.pid], SESSION_S + TAKEOVER_MARGIN_S, "the standby's term")
    took_over_s = time.monotonic() - killed_at
    wait_until(all_accounted(pair.states, ids), 300, f"every event to be accounted for: {pair.log(1)}")
    group = pair.group
    wait_until(
        lambda: end_offsets(pair.broker, pair.topic, group)[1] == end_offsets(pair.broker, pair.topic, group)[0],
        120,
        "commits at the log end",
    )
    assert standby.poll() is None, pair.log(1)
    standby_epoch = terms(pair.broker.bootstrap, pair.versions)[-1]["epoch"]
    lineage = version_lineage(pair)  # version -> (epoch, parent), from the topic's records in order
    own = sorted(v for v, (epoch, _) in lineage.items() if epoch == standby_epoch)
    assert own and own[0] == newest + 1, f"the standby's versions {own} after {newest}: {pair.log(1)}"
    assert lineage[own[0]][1] == newest, "the standby's first version descends from the newest published one"
    assert "rebuilt the replay buffer" in (tmp_path / "b.log").read_text(), "the takeover warms up from the stream"
    statuses = {status for status, _ in accounted(pair.states, ids).values()}
    assert statuses <= {"trained", "held_out", "buffered"}, statuses
    print(f"takeover {took_over_s:.1f} s after kill -9 (session {SESSION_S} s)")
    # The first trainer comes back on its own disk, whose checkpoint predates the standby's versions.
    standby.kill()
    standby.wait()
    newest = pair.newest_on_topic()
    back = pair.spawn(0)
    publish(pair.broker, pair.topic, keyword_events(100, LABELS, seed=33, prefix="t"), tmp_path)
    wait_until(lambda: pair.newest_on_topic() > newest, 240, f"the first trainer to publish again: {pair.log(0)}")
    assert back.poll() is None and pair.holders()[-1] == back.pid
    lineage = version_lineage(pair)
    assert lineage[newest + 1][1] == newest, "its checkpoint is outdated: it resumes from the newest version"
    assert "resuming from the topic" in (tmp_path / "a.log").read_text()


def version_lineage(pair: Pair) -> dict[int, tuple[int, int | None]]:
    """Each version's (epoch, parent) from its first record on the versions topic."""
    out: dict[int, tuple[int, int | None]] = {}
    for r in topic_records(pair.broker.bootstrap, pair.versions):
        if r.value is not None:
            record = decode_version(r.value)
            meta = json.loads(record.files["meta.json"])
            out.setdefault(record.version, (record.epoch, meta.get("parent")))
    return out


def test_a_paused_trainer_resumed_after_a_takeover_publishes_nothing_more(
    pair: Pair, tiny_settings: Settings, tmp_path: Path
) -> None:
    active, standby = pair.start()
    publish(pair.broker, pair.topic, keyword_events(300, LABELS, seed=41), tmp_path)
    wait_until(lambda: pair.newest_on_topic() >= 2, 240, "the active trainer to publish")
    os.kill(active.pid, signal.SIGSTOP)
    publish(pair.broker, pair.topic, keyword_events(300, LABELS, seed=42, prefix="s"), tmp_path)
    wait_until(lambda: pair.holders()[-1:] == [standby.pid], SESSION_S + TAKEOVER_MARGIN_S, "the standby's term")
    old, new = (t["epoch"] for t in terms(pair.broker.bootstrap, pair.versions)[-2:])
    wait_until(
        lambda: ("pointer", new) in epochs_in_order(pair.broker.bootstrap, pair.versions), 240, "a new-term pointer"
    )
    os.kill(active.pid, signal.SIGCONT)
    assert active.wait(timeout=120) == 1, f"the paused trainer must stop on its lost term: {pair.log(0)}"
    assert "lost its term" in pair.whole_log(0)
    publish(pair.broker, pair.topic, keyword_events(100, LABELS, seed=43, prefix="t"), tmp_path)  # the new term goes on
    wait_until(lambda: pair.newest_on_topic() > 0 and standby.poll() is None, 30, "the new term to go on")
    for kind in ("version", "pointer"):
        seq = [e for k, e in epochs_in_order(pair.broker.bootstrap, pair.versions) if k == kind]
        after = seq[seq.index(new) :] if new in seq else []
        assert old not in after, f"a {kind} record of the lost term {old} after the new term {new}: {seq}"
    standby.send_signal(signal.SIGTERM)  # the topics hold still while a replica reads them
    assert standby.wait(timeout=120) == 0, pair.log(1)
    registry = FollowingRegistry(tmp_path / "replica")
    follower = registry.follower = Follower(
        tiny_settings, registry, f"kafka://{pair.broker.bootstrap}/{pair.versions}", CollectorRegistry()
    )
    follower.start()
    try:
        serving = registry.serving().version
        assert serving is not None
        pointer = [decode_pointer(r.value) for r in topic_records(pair.broker.bootstrap, pointer_topic(pair.versions))][
            -1
        ]
        assert pointer.epoch == new and pointer.pointer["version"] == serving
    finally:
        follower.stop()
