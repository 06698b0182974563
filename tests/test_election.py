"""The election's configuration, the record keys of tasks, and an outdated checkpoint (no broker needed)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch

from dynft.election import Election
from dynft.errors import ConfigError, RegistryError
from dynft.loopstate import LoopState
from dynft.registry import AdapterRegistry, AdapterState
from dynft.replication.records import (
    PointerLog,
    PointerRecord,
    VersionRecord,
    decode_pointer,
    decode_version,
    encode_pointer,
    encode_version,
    parse_version_key,
    pointer_key,
    task_of_pointer_key,
    version_key,
)
from dynft.settings import Settings
from dynft.term import outdated, shard_topic, task_partition, term_topic


def test_the_election_needs_a_versions_topic_and_a_kafka_source(tiny_settings: Settings) -> None:
    with pytest.raises(ConfigError, match=r"kafka\.versions_topic"):
        Election(tiny_settings, "host:1")
    tiny_settings.kafka.versions_topic = "dynft.versions"
    with pytest.raises(ConfigError, match="kafka:// source"):
        Election(tiny_settings, "host:1")
    tiny_settings.source.uri = "kafka://127.0.0.1:9/events?group=g"
    election = Election(tiny_settings, "host:1")
    assert (election.topic, election.group) == (term_topic("dynft.versions"), "g.leader")
    assert not election.lost and election.epoch == 0


@pytest.mark.parametrize(
    "key",
    [b"task/../version/000001", b"task/a/b/version/000001", b"task//version/000001", b"tasks/a/version/1", b"x"],
)
def test_a_version_key_that_names_no_task_safely_is_refused(key: bytes) -> None:
    assert parse_version_key(key) is None


@pytest.mark.parametrize(
    "value",
    [
        b'{"epoch": 1, "origin": "r", "pointer": {"version": 3, "extra": 1}}',  # a field no pointer has
        b'{"epoch": 1e999, "origin": "r", "pointer": {"version": 3}}',  # an epoch no int can be
        b'{"epoch": 1, "origin": "r", "pointer": {"version": 3, "history": "v2"}}',  # would damage serving.json
        b'{"epoch": 1, "origin": "r", "pointer": {"version": true}}',
        b'{"epoch": 1, "origin": "r", "pointer": {"version": 3, "updated_at": 5}}',  # compared with time stamps
        b'{"epoch": 1, "origin": "r", "pointer": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # deeper than the parser
        # Found by a probe: an int too large for a float passed, and every later metric update
        # (and every replica's and trainer's start) raised OverflowError; its epoch also fenced
        # out every trainer there would ever be.
        b'{"epoch": 1' + b"0" * 400 + b', "origin": "r", "pointer": {"version": 3}}',
        b'{"epoch": 1, "origin": "r", "pointer": {"version": 1' + b"0" * 400 + b"}}",
        b'{"epoch": 1, "origin": "r", "pointer": {"version": 3, "history": [{"version": 1e3}]}}',
        b'{"epoch": "7", "origin": "r", "pointer": {"version": 3}}',  # a string is no epoch, not even "7"
        b'{"epoch": 1, "origin": ["r"], "pointer": {"version": 3}}',
        b'{"epoch": 1, "origin": "r", "pointer": {"version": 3}, "seen": -2}',
        b'{"epoch": 1, "origin": "r", "pointer": {"version": 3}, "shard": 2.5}',
        b'{"epoch": 1, "origin": "r"}',
        b"[1, 2]",
    ],
)
def test_a_pointer_record_no_serving_json_could_hold_is_malformed(value: bytes) -> None:
    """Refused where it is read (each reader skips it alone), not where it is written or adopted."""
    with pytest.raises(RegistryError, match="malformed pointer record"):
        decode_pointer(value)


@pytest.mark.parametrize(
    "header",
    [
        b'{"version": 9, "epoch": 1, "origin": "e", "files": [[["x"], 0]]}',  # a name no string: AttributeError
        b'{"version": 9, "epoch": 1, "origin": "e", "files": [["a", 1.5]]}',
        b'{"version": 9, "epoch": 1, "origin": "e", "files": [["a", 1' + b"0" * 400 + b"]]}",
        b'{"version": 9, "epoch": 1, "origin": "e", "files": [["", 0]]}',
        b'{"version": 9, "epoch": 1, "origin": "e", "files": [["a"]]}',
        b'{"version": 9, "epoch": 1, "origin": "e", "files": {"a": 0}}',
        b'{"version": -1, "epoch": 1, "origin": "e", "files": []}',
        b'{"version": 9, "epoch": 1' + b"0" * 400 + b', "origin": "e", "files": []}',
        b'{"version": 9, "epoch": 1, "origin": 5, "files": []}',
        b'"version"',
    ],
)
def test_a_version_record_of_any_other_shape_is_malformed(header: bytes) -> None:
    """Found by a probe: a file name that was a list raised AttributeError out of the replica's
    follower (losing the rest of its poll) and out of every replica's and trainer's start."""
    with pytest.raises(RegistryError, match="malformed version record"):
        decode_version(header + b"\n")


@pytest.mark.parametrize("value", ['"epoch"', "[1]", "7", "null"])
def test_a_number_is_read_only_from_an_object(value: str) -> None:
    """Found by a review: a term record whose value was the JSON string "epoch" passed `key in data`
    as a substring test and raised AttributeError, which the election's reader did not skip."""
    import json

    from dynft.replication.records import number

    with pytest.raises(ValueError, match="not a JSON object"):
        number(json.loads(value), "epoch")


def test_task_keys_round_trip_and_bad_task_names_in_records_are_malformed() -> None:
    assert parse_version_key(version_key(3, "intents")) == ("intents", 3)
    assert task_of_pointer_key(pointer_key("intents")) == "intents"
    assert task_of_pointer_key(b"serving/..") is None
    record = VersionRecord(3, 1, "t", {"meta.json": b"{}"}, "intents")
    assert decode_version(encode_version(record)) == record
    pointer = PointerRecord(1, "t", {"version": 3}, 0, "intents")
    assert decode_pointer(encode_pointer(pointer)) == pointer
    with pytest.raises(RegistryError, match="malformed"):
        decode_version(encode_version(VersionRecord(3, 1, "t", {"meta.json": b"{}"}, "../etc")))
    with pytest.raises(RegistryError, match="malformed"):
        decode_pointer(encode_pointer(PointerRecord(1, "t", {"version": 3}, 0, "a/b")))


@pytest.mark.parametrize("meta", [b"\xff", b"{", b"[1]", b"[" * 100_000])
def test_a_version_record_whose_meta_is_unreadable_has_no_content_hash(meta: bytes) -> None:
    """Read at a trainer's start to know which of its versions the topic holds: a record whose
    meta.json is no JSON object raised out of the start; such a version is now sent again."""
    from dynft.replication.found import content_hash

    assert content_hash(VersionRecord(3, 1, "t", {"meta.json": meta})) == ""
    assert content_hash(VersionRecord(3, 1, "t", {"meta.json": b'{"content_hash": "ab"}'})) == "ab"


def test_a_checkpoint_older_than_the_newest_version_is_outdated(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path)
    for i in range(3):
        registry.publish(AdapterState({"w": torch.full((2,), float(i))}, ["a"], {"peft_type": "LORA"}), {"step": i})
    assert outdated({"publisher": {"latest_version": 2}}, registry)
    assert not outdated({"publisher": {"latest_version": 3}}, registry)


def test_epochs_are_fenced_within_a_shard_only() -> None:
    log = PointerLog()
    assert log.admit_epoch(5, shard=0, task="a")
    assert not log.admit_epoch(4, shard=0, task="b")  # unsharded, every task is in shard 0: one fence for all
    assert log.admit_epoch(3, shard=1, task="c")  # another partition's trainer holds its own, older term
    assert not log.admit_epoch(2, shard=1, task="c")
    assert log.fence_of("c") == (3, 1) and log.fence_of("a") == (5, 0) and log.epoch == 5
    stale = PointerRecord(2, "trainer-2", {"version": 1}, 0, "c", shard=1)
    assert log.admit(stale, offset=0) == "stale"
    record = VersionRecord(3, 1, "t", {"meta.json": b"{}"}, "intents", shard=2)
    assert decode_version(encode_version(record)) == record


def test_sharding_needs_an_election_and_one_source_topic(tiny_settings: Settings) -> None:
    with pytest.raises(ValueError, match=r"kafka\.election"):
        Settings(kafka={"sharded": True})  # type: ignore[arg-type]
    tiny_settings.kafka.versions_topic = "dynft.versions"
    tiny_settings.kafka.election = tiny_settings.kafka.sharded = True
    tiny_settings.source.uri = "kafka://127.0.0.1:9/one,two?group=g"
    with pytest.raises(ConfigError, match="one source topic"):
        Election(tiny_settings, "host:1")
    tiny_settings.source.uri = "kafka://127.0.0.1:9/events?group=g"
    election = Election(tiny_settings, "host:1")
    assert election.topic == shard_topic("dynft.versions")
    election.partitions = 4
    names = [f"t{i}" for i in range(40)]
    assert {election.partition_of(t) for t in names} == {0, 1, 2, 3}
    assert all(election.partition_of(t) == task_partition(t, 4) for t in names)


class _Versions:
    """A publisher as the commit rule sees it: whether its task's steps are all on the versions topic."""

    def __init__(self) -> None:
        self.on_topic = True


def test_commits_wait_only_for_the_oldest_step_of_each_task_not_on_the_topic() -> None:
    loop = LoopState.__new__(LoopState)  # the rule alone: no model, no broker
    loop.election, loop.publisher = cast(Any, object()), cast(Any, _Versions())
    loop.tasks = {"b": cast(Any, SimpleNamespace(publisher=_Versions()))}
    loop.positions, loop._covered, loop._pending_from, loop._uncommitted = {"t/0": 10}, {}, {}, False
    loop._note_covered()
    assert loop._covered == {"t/0": 10}  # every step on the topic: everything so far
    loop.publisher.on_topic = False  # the default task trains events 10..20
    loop._note_pending({"t/0": 10})
    loop.positions = {"t/0": 20}
    loop._note_covered()
    assert loop._covered == {"t/0": 10}
    loop.tasks["b"].publisher.on_topic = False  # task b trains 20..30; the default task's steps reach the topic
    loop._note_pending({"t/0": 20})
    loop.positions = {"t/0": 30, "t/1": 5}
    loop.publisher.on_topic = True
    loop._note_covered()
    assert loop._covered == {"t/0": 20}  # b's wait began before t/1 was known: t/1 waits too
    loop.tasks["b"].publisher.on_topic = True
    loop._note_covered()
    assert loop._covered == {"t/0": 30, "t/1": 5} and loop._uncommitted


def test_an_empty_revocation_is_news_too() -> None:
    """A standby's rebalance revokes nothing; reported all the same, it starts the wait for an
    assignment that a join that never ends would leave unanswered (``Election._join_stalled``)."""
    import queue

    from dynft.election import _Listener

    news: queue.SimpleQueue[tuple[str, frozenset[int]]] = queue.SimpleQueue()
    listener = _Listener(news)
    listener.on_partitions_revoked(set())
    listener.on_partitions_assigned(set())
    assert [news.get_nowait(), news.get_nowait()] == [("revoked", frozenset()), ("assigned", frozenset())]


def test_an_epoch_no_trainer_counts_to_is_not_counted_on(tmp_path: Path) -> None:
    """Counting on from 2^53 - 1 (a hand-written record) gave epochs every replica refuses."""
    from dynft.replication.records import TOP_EPOCH, next_epoch

    assert next_epoch(tmp_path, at_least=4) == 5
    assert next_epoch(tmp_path, at_least=2**53 - 1) == 6  # the file's 5, counted on
    assert next_epoch(tmp_path, at_least=TOP_EPOCH - 1) == TOP_EPOCH
    assert next_epoch(tmp_path / "fresh", at_least=TOP_EPOCH) == 1
