"""The records on the versions topics, and the trainer epoch they carry.

Two compacted topics: ``<versions_topic>`` holds one record per adapter version (key
``version/000007``), ``<versions_topic>.pointer`` the serving pointer (key ``serving``) after
every promote / rollback / pin decision. A task other than ``default`` (``dynft.tasks``) has its
own keys on the same topics, ``task/<task>/version/000007`` and ``serving/<task>``, so one pair
of topics carries every task and a replica serves them all; the default task's keys are those
of a single-task trainer, unchanged. A version record's value is one JSON header line
followed by the version's files, byte for byte as the registry wrote them (``meta.json`` with
its content hash and base-model fingerprint included), so a replica can rebuild the version
directory and check it exactly as the co-located server does.

Every record carries the epoch of the trainer that wrote it (a pointer decision made on a
replica carries the newest epoch that replica has seen for the task's shard): a record with an
older epoch than one already seen *in its shard* comes from a stale trainer and is ignored.
Records carry their *shard*: 0 unless trainers are sharded (``kafka.sharded``), where it is the
source partition of the task, over which a trainer holds its own term; sharded trainers hold
different epochs at once, each fenced only within its partitions. Unsharded, every record is in
shard 0, so one newer epoch fences every record of an older one, whatever its task.

Serving decisions are ordered by the pointer topic's offsets, not by clocks: each pointer record
carries ``seen``, the offset of the newest pointer record its writer had read when it decided.
An unpinned decision that had not seen the newest pin (the trainer's gate promoting while an
operator's rollback was on its way) is void; ``PointerLog`` folds the topic by that rule, so
the trainer and every replica agree on what serves.

>>> files = {"meta.json": b'{"version": 7}', "labels.json": b'["a"]'}
>>> record = VersionRecord(7, 3, "trainer", files)
>>> decode_version(encode_version(record)) == record
True
>>> pointer = PointerRecord(3, "replica", {"version": 7, "pinned": True}, seen=4)
>>> decode_pointer(encode_pointer(pointer)) == pointer
True
>>> parse_version_key(version_key(7, "spam")), parse_version_key(b"version/000007")
(('spam', 7), ('default', 7))
>>> task_of_pointer_key(pointer_key("spam")), task_of_pointer_key(b"serving")
('spam', 'default')
>>> log = PointerLog()
>>> log.admit(PointerRecord(3, "replica", {"version": 6, "pinned": True}, seen=4), offset=5)
'applied'
>>> log.admit(PointerRecord(3, "trainer-3", {"version": 8, "pinned": False}, seen=4), offset=6)
'void'
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynft.durable import write_atomic
from dynft.errors import RegistryError, RegistryWriteError
from dynft.events import DEFAULT_TASK, task_name_problem
from dynft.pointer import MAX_NUMBER, is_number, pointer_problem

POINTER_KEY = b"serving"
log = logging.getLogger(__name__)
EPOCH_FILE = "epoch"
# Trainers count epochs up from 1, one per takeover: one at or above this was written by hand (or
# by something else), and counting on from it would soon pass 2^53, where every record the trainer
# writes is malformed to replicas. It is not counted, so the next epoch always leaves room.
TOP_EPOCH = MAX_NUMBER - (1 << 20)


@dataclass(frozen=True)
class VersionRecord:
    version: int
    epoch: int
    origin: str
    files: dict[str, bytes]  # file name in the version directory -> its bytes
    task: str = DEFAULT_TASK
    shard: int = 0  # the term's partition when sharded (see the module's docstring)


@dataclass(frozen=True)
class PointerRecord:
    epoch: int
    origin: str
    pointer: dict[str, Any]  # the registry's ServingPointer fields
    seen: int = -1  # offset of the newest pointer record the writer had read when it decided
    task: str = DEFAULT_TASK
    shard: int = 0


@dataclass
class PointerLog:
    """The pointer topic folded in offset order: which records decide what serves.

    One reader thread owns it (the follower's or the feed's). A record is ``stale`` when its
    epoch is older than the newest seen in its shard (a stale trainer), ``void`` when it unpins
    without having seen the newest pin (decided before that pin reached its writer), else
    ``applied``.
    """

    seen: int = -1  # offset of the last record read
    pins: dict[str, int] = field(default_factory=dict)  # task -> offset of its newest applied pinned decision
    epochs: dict[int, int] = field(default_factory=dict)  # shard -> newest trainer epoch seen (either topic)
    shards: dict[str, int] = field(default_factory=dict)  # task -> its shard, as its newest admitted record says

    @property
    def epoch(self) -> int:
        """The newest trainer epoch seen in any shard."""
        return max(self.epochs.values(), default=0)

    def admit(self, record: PointerRecord, offset: int) -> str:
        self.seen = max(self.seen, offset)
        if not self.admit_epoch(record.epoch, record.shard, record.task):
            return "stale"
        if voided(record, self.pin_offset(record.task)):
            return "void"
        if record.pointer.get("pinned"):
            self.pins[record.task] = offset
        return "applied"

    def admit_epoch(self, epoch: int, shard: int = 0, task: str = DEFAULT_TASK) -> bool:
        """Whether a record of ``epoch`` in ``shard`` may be applied: not older than the shard's newest."""
        if epoch < self.epochs.get(shard, 0):
            return False
        self.epochs[shard] = epoch
        self.shards[task] = shard
        return True

    def fence_of(self, task: str = DEFAULT_TASK) -> tuple[int, int]:
        """(epoch, shard) for a decision about ``task`` made here (a replica's): its shard's newest epoch."""
        shard = self.shards.get(task, 0)
        return self.epochs.get(shard, 0), shard

    def pin_offset(self, task: str = DEFAULT_TASK) -> int:
        return self.pins.get(task, -1)


def voided(record: PointerRecord, pin_offset: int) -> bool:
    """An unpinned decision whose writer had not read the pin at ``pin_offset`` yet."""
    return not record.pointer.get("pinned") and record.seen < pin_offset


def version_key(version: int, task: str = DEFAULT_TASK) -> bytes:
    prefix = "" if task == DEFAULT_TASK else f"task/{task}/"
    return f"{prefix}version/{version:06d}".encode()


def parse_version_key(key: bytes | None) -> tuple[str, int] | None:
    """``(task, version)`` of a versions-topic key, None for a key that is not one."""
    text = (key or b"").decode(errors="replace")
    head, _, number = text.rpartition("/")
    if not number.isdigit():
        return None
    if head == "version":
        return DEFAULT_TASK, int(number)
    task, sep, tail = head.removeprefix("task/").rpartition("/")
    if not head.startswith("task/") or tail != "version" or not sep or task_name_problem(task) is not None:
        return None
    return task, int(number)


def pointer_key(task: str = DEFAULT_TASK) -> bytes:
    return POINTER_KEY if task == DEFAULT_TASK else POINTER_KEY + b"/" + task.encode()


def task_of_pointer_key(key: bytes | None) -> str | None:
    """The task a pointer-topic key decides for, None for a key that is not a pointer key."""
    if key == POINTER_KEY:
        return DEFAULT_TASK
    prefix = POINTER_KEY + b"/"
    if key is None or not key.startswith(prefix) or len(key) == len(prefix):
        return None
    task = key[len(prefix) :].decode(errors="replace")
    return None if task_name_problem(task) is not None else task


def pointer_topic(versions_topic: str) -> str:
    return f"{versions_topic}.pointer"


def encode_version(record: VersionRecord) -> bytes:
    names = sorted(record.files)
    header = {
        "kind": "version",
        "version": record.version,
        "epoch": record.epoch,
        "origin": record.origin,
        "files": [[name, len(record.files[name])] for name in names],
    }
    if record.task != DEFAULT_TASK:
        header["task"] = record.task
    if record.shard:
        header["shard"] = record.shard
    return json.dumps(header).encode() + b"\n" + b"".join(record.files[name] for name in names)


def number(data: dict[str, Any], key: str, default: int | None = None, low: int = 0) -> int:
    """``data[key]``, an integer from ``low`` to below 2^53 (see ``dynft.pointer.MAX_NUMBER``):
    every number on these topics is one; anything else is garbage, never converted."""
    if not isinstance(data, dict):  # a JSON string would pass `key in data` as a substring test
        raise ValueError("not a JSON object")
    if key not in data and default is None:
        raise ValueError(f"no {key!r} field")
    value = data.get(key, default)
    if not isinstance(value, int) or not is_number(value, low):
        raise ValueError(f"{key} is not an integer from {low} to 2^53")
    return value


def decode_version(value: bytes) -> VersionRecord:
    """Raises ``RegistryError`` for a record that is not a well-formed version record."""
    head, sep, body = value.partition(b"\n")
    try:
        header = json.loads(head)
        if not isinstance(header, dict) or not isinstance(header.get("files"), list):
            raise ValueError("the header is not an object with a list of files")
        files, offset = {}, 0
        for entry in header["files"]:
            name, length = entry if isinstance(entry, list) and len(entry) == 2 else (None, None)
            if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
                raise ValueError(f"bad file entry {str(entry)[:80]}")
            if not isinstance(length, int) or not is_number(length):
                raise ValueError(f"bad length of file {name[:80]!r}")
            files[name] = body[offset : offset + length]
            offset += length
        if not sep or offset != len(body):
            raise ValueError(f"{len(body)} bytes of files, the header lists {offset}")
        task, shard = checked_task(header.get("task", DEFAULT_TASK)), number(header, "shard", 0)
        origin = header.get("origin")
        if not isinstance(origin, str):
            raise ValueError("origin is not a string")
        return VersionRecord(number(header, "version"), number(header, "epoch"), origin, files, task, shard)
    except (ValueError, TypeError, RecursionError) as exc:
        raise RegistryError(f"malformed version record ({exc})") from exc


def checked_task(name: Any) -> str:
    """A record's task name; ``ValueError`` for one that could not name a registry directory."""
    problem = task_name_problem(name) if isinstance(name, str) else f"task {name!r} is not a string"
    if problem is not None:
        raise ValueError(problem)
    return str(name)


def encode_pointer(record: PointerRecord) -> bytes:
    return json.dumps(
        {
            "kind": "pointer",
            "epoch": record.epoch,
            "origin": record.origin,
            "pointer": record.pointer,
            "seen": record.seen,
            "task": record.task,
            "shard": record.shard,
        }
    ).encode()


def decode_pointer(value: bytes) -> PointerRecord:
    """Raises ``RegistryError`` for a record that is not a well-formed pointer record."""
    try:
        data = json.loads(value)
        if not isinstance(data, dict) or "pointer" not in data:
            raise ValueError("not an object with a 'pointer' field")
        pointer = data["pointer"]
        problem = pointer_problem(pointer)  # as serving.json is checked: what it holds is written there
        if problem is not None:
            raise ValueError(problem)
        task, shard = checked_task(data.get("task", DEFAULT_TASK)), number(data, "shard", 0)
        origin = data.get("origin")
        if not isinstance(origin, str):
            raise ValueError("origin is not a string")
        epoch, seen = number(data, "epoch"), number(data, "seen", -1, low=-1)
        return PointerRecord(epoch, origin, pointer, seen, task, shard)
    except (ValueError, TypeError, RecursionError) as exc:
        raise RegistryError(f"malformed pointer record ({exc})") from exc


def next_after(*epochs: int) -> int:
    """The epoch after the newest of ``epochs`` that a trainer can have counted to (below ``TOP_EPOCH``)."""
    if max(epochs, default=0) >= TOP_EPOCH:
        log.error(
            "an epoch of %d (on the topics, or in a state directory's epoch file) is not one a trainer counts "
            "to: not counted on; a record no trainer wrote may fence this trainer",
            max(epochs),
        )
    return max(e for e in (*epochs, 0) if e < TOP_EPOCH) + 1


def next_epoch(state_dir: Path, at_least: int = 0) -> int:
    """Increment and durably store the trainer's epoch in ``<state_dir>/epoch``; returns the new one.

    ``at_least``: the newest epoch seen on the topics (a trainer whose state directory was
    lost still writes above every earlier trainer).
    """
    path = state_dir / EPOCH_FILE
    try:
        current = int(path.read_text().strip()) if path.exists() else 0
    except (OSError, ValueError) as exc:
        raise RegistryError(f"unreadable trainer epoch file {path} ({exc})") from exc
    epoch = next_after(current, at_least)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(path, f"{epoch}\n".encode())
    except OSError as exc:
        raise RegistryWriteError(f"cannot store the trainer epoch in {path} ({exc.strerror or exc})") from exc
    return epoch
