"""The election's configuration, the record keys of tasks, and an outdated checkpoint (no broker needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dynft.election import Election, outdated, term_topic
from dynft.errors import ConfigError, RegistryError
from dynft.registry import AdapterRegistry, AdapterState
from dynft.replication.records import (
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


def test_a_checkpoint_older_than_the_newest_version_is_outdated(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path)
    for i in range(3):
        registry.publish(AdapterState({"w": torch.full((2,), float(i))}, ["a"], {"peft_type": "LORA"}), {"step": i})
    assert outdated({"publisher": {"latest_version": 2}}, registry)
    assert not outdated({"publisher": {"latest_version": 3}}, registry)
