"""What the versions topics hold when a trainer starts: read once, up to their ends, then followed.

``read_topics`` folds the pointer topic's decisions as every replica folds them
(``records.PointerLog``) and keeps the version records present, by task; the feed opens each
task's lane from it, and an election reads the newest epoch from it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from dynft.errors import RegistryError
from dynft.events import DEFAULT_TASK
from dynft.registry import META
from dynft.replication.records import (
    PointerLog,
    PointerRecord,
    VersionRecord,
    decode_pointer,
    decode_version,
    parse_version_key,
    pointer_topic,
    task_of_pointer_key,
)

log = logging.getLogger(__name__)


@dataclass
class TopicState:
    """What the versions topics hold when the trainer starts (every task's keys)."""

    log: PointerLog = field(default_factory=PointerLog)
    pointers: dict[str, PointerRecord] = field(default_factory=dict)  # task -> its newest applied decision
    versions: dict[tuple[str, int], VersionRecord] = field(default_factory=dict)  # (task, version) on the topic
    end: int = 0  # the pointer topic's end offset

    @property
    def pointer(self) -> PointerRecord | None:
        """The default task's newest applied decision."""
        return self.pointers.get(DEFAULT_TASK)


def read_topics(consumer: Any, topic: str) -> TopicState:
    """Both topics up to their current end: the folded pointer log and the version records present.

    Leaves ``consumer`` on the pointer topic alone, where it stopped (the feed's thread reads on
    from there, without fetching back the adapters the trainer sends).
    """
    from kafka import TopicPartition

    parts = [TopicPartition(topic, 0), TopicPartition(pointer_topic(topic), 0)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    ends = consumer.end_offsets(parts)
    state = TopicState(end=ends[parts[1]])
    while any(consumer.position(tp) < ends[tp] for tp in parts):
        for tp, records in consumer.poll(timeout_ms=500).items():
            for record in records:
                try:
                    _read_one(state, tp.topic == topic, record)
                except RegistryError as exc:
                    log.warning("skipping a record of %s at offset %d: %s", tp.topic, record.offset, exc)
    position = consumer.position(parts[1])
    consumer.assign([parts[1]])
    consumer.seek(parts[1], position)
    return state


def _read_one(state: TopicState, is_version: bool, record: Any) -> None:
    if is_version:
        where = parse_version_key(record.key)
        if record.value is None and where is not None:
            state.versions.pop(where, None)
        elif record.value is not None:
            version = decode_version(record.value)
            if state.log.admit_epoch(
                version.epoch, version.shard, version.task
            ):  # a stale trainer's version is not resumed from
                state.versions[(version.task, version.version)] = version
        return
    task = task_of_pointer_key(record.key)
    if task is not None and record.value is not None:
        pointer = decode_pointer(record.value)
        if state.log.admit(pointer, record.offset) == "applied":
            state.pointers[pointer.task] = pointer


def content_hash(record: VersionRecord) -> str:
    """The content hash its ``meta.json`` names; "" where that is unreadable (the version is sent again)."""
    try:
        meta = json.loads(record.files.get(META, b"{}"))
    except (ValueError, RecursionError):
        return ""
    return str(meta.get("content_hash")) if isinstance(meta, dict) else ""
