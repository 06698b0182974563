"""The records on the versions topics, and the trainer epoch they carry.

Two compacted topics: ``<versions_topic>`` holds one record per adapter version (key
``version/000007``), ``<versions_topic>.pointer`` the serving pointer (key ``serving``) after
every promote / rollback / pin decision. A version record's value is one JSON header line
followed by the version's files, byte for byte as the registry wrote them (``meta.json`` with
its content hash and base-model fingerprint included), so a replica can rebuild the version
directory and check it exactly as the co-located server does.

Every record carries the epoch of the trainer that wrote it (a pointer decision made on a
replica carries the newest epoch that replica has seen): a record with an older epoch than one
already seen comes from a stale trainer and is ignored.

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
>>> log = PointerLog()
>>> log.admit(PointerRecord(3, "replica", {"version": 6, "pinned": True}, seen=4), offset=5)
'applied'
>>> log.admit(PointerRecord(3, "trainer-3", {"version": 8, "pinned": False}, seen=4), offset=6)
'void'
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynft.errors import RegistryError, RegistryWriteError
from dynft.registry import write_atomic

POINTER_KEY = b"serving"
EPOCH_FILE = "epoch"


@dataclass(frozen=True)
class VersionRecord:
    version: int
    epoch: int
    origin: str
    files: dict[str, bytes]  # file name in the version directory -> its bytes


@dataclass(frozen=True)
class PointerRecord:
    epoch: int
    origin: str
    pointer: dict[str, Any]  # the registry's ServingPointer fields
    seen: int = -1  # offset of the newest pointer record the writer had read when it decided


@dataclass
class PointerLog:
    """The pointer topic folded in offset order: which records decide what serves.

    One reader thread owns it (the follower's or the feed's). A record is ``stale`` when its
    epoch is older than the newest seen (a stale trainer), ``void`` when it unpins without
    having seen the newest pin (decided before that pin reached its writer), else ``applied``.
    """

    seen: int = -1  # offset of the last record read
    pin_offset: int = -1  # offset of the newest applied pinned decision
    epoch: int = 0  # newest trainer epoch seen

    def admit(self, record: PointerRecord, offset: int) -> str:
        self.seen = max(self.seen, offset)
        if record.epoch < self.epoch:
            return "stale"
        self.epoch = record.epoch
        if voided(record, self.pin_offset):
            return "void"
        if record.pointer.get("pinned"):
            self.pin_offset = offset
        return "applied"


def voided(record: PointerRecord, pin_offset: int) -> bool:
    """An unpinned decision whose writer had not read the pin at ``pin_offset`` yet."""
    return not record.pointer.get("pinned") and record.seen < pin_offset


def version_key(version: int) -> bytes:
    return f"version/{version:06d}".encode()


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
    return json.dumps(header).encode() + b"\n" + b"".join(record.files[name] for name in names)


def decode_version(value: bytes) -> VersionRecord:
    """Raises ``RegistryError`` for a record that is not a well-formed version record."""
    head, sep, body = value.partition(b"\n")
    try:
        header = json.loads(head)
        files, offset = {}, 0
        for name, length in header["files"]:
            if "/" in name or name.startswith(".") or length < 0:
                raise ValueError(f"bad file entry {name!r}")
            files[str(name)] = body[offset : offset + int(length)]
            offset += int(length)
        if not sep or offset != len(body):
            raise ValueError(f"{len(body)} bytes of files, the header lists {offset}")
        return VersionRecord(int(header["version"]), int(header["epoch"]), str(header["origin"]), files)
    except (ValueError, KeyError, TypeError) as exc:
        raise RegistryError(f"malformed version record ({exc})") from exc


def encode_pointer(record: PointerRecord) -> bytes:
    return json.dumps(
        {
            "kind": "pointer",
            "epoch": record.epoch,
            "origin": record.origin,
            "pointer": record.pointer,
            "seen": record.seen,
        }
    ).encode()


def decode_pointer(value: bytes) -> PointerRecord:
    try:
        data = json.loads(value)
        pointer = data["pointer"]
        if not isinstance(pointer, dict) or not isinstance(pointer.get("version"), int | None):
            raise ValueError("no pointer with a version")
        return PointerRecord(int(data["epoch"]), str(data["origin"]), pointer, int(data.get("seen", -1)))
    except (ValueError, KeyError, TypeError) as exc:
        raise RegistryError(f"malformed pointer record ({exc})") from exc


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
    epoch = max(current, at_least) + 1
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(path, f"{epoch}\n".encode())
    except OSError as exc:
        raise RegistryWriteError(f"cannot store the trainer epoch in {path} ({exc.strerror or exc})") from exc
    return epoch
