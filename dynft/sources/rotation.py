"""Log rotation for the file source's follow mode: the files a path names in turn, and where a
restart resumes.

A rotated file (renamed, created anew) is read to its end before its successor; a file rotated
again before the reader reached it must not be skipped, so every file the path names is opened
as soon as it is seen (an open descriptor keeps a renamed or deleted file readable) and read in
the order seen. After a restart, the checkpoint's file is found again by its inode in the path's
directory (logrotate renames within it), so that its rest is read first, then the files rotated
after it (named like the path, written later), then the file the path names now.

A regular file's position is one integer, so that the checkpoint's furthest position per stream
is the latest: ``generation`` (grows when a file is read again from its top or the next file is
read), ``inode``, the byte ``offset``, and the length and CRC-32 of the bytes before it (the
whole line, and at least ``CHECKED`` bytes), by which a restart tells whether the file it finds
is the one the checkpoint was taken in: an inode number is soon reused once a file is deleted.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
import zlib
from collections import deque
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

ROTATION_GRACE_S = 2.0  # a rotated file's writer may append for a moment before it reopens the path
MAX_WAITING = 64  # successors held open at most
# A rotated file's name: the path's and a number or a date (``.1``, ``-20261204``, ``.2026-12-04``);
# a compressed one (``.1.gz``) is no JSON Lines, and a backup or swap file no rotation.
ROTATED = r"[.-](\d[\d._-]*)"

OFFSET_BITS = 48  # 256 TB
INODE_BITS = 64
CHECKED = 64  # at least this many bytes before a position (a short line's predecessors too) are checked
LONGEST_CHECKED = (1 << 20) - 1  # a longer line: only its last CHECKED bytes
CHECK_BITS = 52  # how many bytes were checked (20 bits), their CRC-32 (32 bits)

Identity = tuple[int, int]  # (device, inode)


def identity(st: os.stat_result) -> Identity:
    return st.st_dev, st.st_ino


class Position(NamedTuple):
    generation: int
    inode: int | None  # None: a plain byte offset (a checkpoint from before positions kept more)
    offset: int
    checked: int  # bytes before ``offset`` whose CRC-32 is ``crc`` (0: only a newline, after a cut line)
    crc: int


def position_base(generation: int, inode: int) -> int:
    """What a file's positions start from: ``with_check(base + offset, ...)`` is one."""
    return ((generation << INODE_BITS) | inode % (1 << INODE_BITS)) << OFFSET_BITS


def with_check(based: int, last: bytes | memoryview) -> int:
    """A position from ``position_base(...) + offset`` and the line's last bytes (``b""``: unchecked)."""
    return (based << CHECK_BITS) | (len(last) << 32) | zlib.crc32(last)


def parse(position: int) -> Position:
    """The parts of a position.

    >>> parse(with_check(position_base(3, 12345) + 70, b"9}\\n"))[:4]  # generation, inode, offset, checked
    (3, 12345, 70, 3)
    """
    if position < 1 << OFFSET_BITS:
        return Position(0, None, position, 0, 0)
    based = position >> CHECK_BITS
    generation, inode = divmod(based >> OFFSET_BITS, 1 << INODE_BITS)
    checked = (position >> 32) & ((1 << (CHECK_BITS - 32)) - 1)
    return Position(generation, inode, based & ((1 << OFFSET_BITS) - 1), checked, position & 0xFFFFFFFF)


def byte_offset(position: int) -> int:
    """The byte offset a file position stands for."""
    return parse(position).offset


def resume_offset(fd: int, at: Position, size: int) -> int | None:
    """Where to go on in the file open as ``fd`` (``size`` bytes) after position ``at``; None
    if that file does not go on there: the bytes before the offset are not the line's checked.

    A checkpoint's offset always follows a newline, except after a last line that had none: that
    offset is one past the file's end (the line counts its missing newline) and reading goes on
    at the end. Anything else means the file was rewritten while dynft was stopped, or its inode
    number went to another file, and the offset means nothing in it.
    """
    offset = at.offset
    if offset == 0:
        return 0
    unended = offset == size + 1 and size > 0 and os.pread(fd, 1, size - 1) != b"\n"
    if offset > size and not unended:
        return None
    end, missing = (size, b"\n") if unended else (offset, b"")
    want = max(at.checked, 1) - len(missing)
    if want > end:
        return None
    last = (os.pread(fd, want, end - want) if want else b"") + missing
    if not last.endswith(b"\n") or (at.checked and zlib.crc32(last) != at.crc):
        return None
    return end


def _age(suffix: str) -> tuple[int, int, str]:
    """Sorts rotated files oldest first by name: ``.3`` before ``.1``, ``-20261203`` before ``-20261204``."""
    return (0, -int(suffix[1:]), "") if suffix[1:].isdigit() else (1, 0, suffix)


def rotated_beside(path: Path) -> dict[Path, os.stat_result]:
    """The rotated files beside ``path`` (named like it, see ``ROTATED``), plain and regular."""
    shape = re.compile(re.escape(path.name) + ROTATED)
    found: dict[Path, os.stat_result] = {}
    try:
        with os.scandir(path.parent) as entries:
            for entry in entries:
                if shape.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                    found[Path(entry.path)] = entry.stat(follow_symlinks=False)
    except OSError:
        return {}
    return found


def rotated_after(path: Path, checkpointed: Path, skip: set[Identity]) -> list[Path]:
    """The files rotated after ``checkpointed`` beside ``path`` (while dynft was stopped), oldest first.

    Newer by name where ``checkpointed`` is named as rotated (``.2`` is older than ``.1``), else
    written since it (one written in the same clock tick is read again rather than lost).
    """
    beside = rotated_beside(path)
    start = len(path.name)
    candidates = [p for p, st in beside.items() if identity(st) not in skip]
    if checkpointed in beside:  # named as rotated: newer by name
        mine = _age(checkpointed.name[start:])
        return sorted((p for p in candidates if _age(p.name[start:]) > mine), key=lambda p: _age(p.name[start:]))
    since = os.stat(checkpointed).st_mtime_ns
    later = [p for p in candidates if beside[p].st_mtime_ns >= since]
    return sorted(later, key=lambda p: (beside[p].st_mtime_ns, _age(p.name[start:])))


def find_checkpointed(path: Path, at: Position, skip: set[Identity]) -> tuple[Path, int, int, bool] | None:
    """The checkpoint's file beside ``path`` after it was rotated while dynft was stopped: found by
    its inode, else a copy of it (``copytruncate``, the original truncated since), a rotated file
    whose bytes before the checkpoint's offset are the ones it checked. Files in ``skip`` are not
    it. Its path, an open descriptor (the caller's), the offset to go on at, and whether it is a copy."""
    found = find_inode(path.parent, at.inode or 0)
    candidates = [(found, False)] if found is not None else []
    if at.offset > 0 and at.checked >= min(CHECKED, at.offset):  # enough bytes to tell a copy
        beside = sorted(rotated_beside(path).items(), key=lambda item: -item[1].st_mtime_ns)
        candidates += [(candidate, True) for candidate, _ in beside if candidate != found]
    for candidate, copy in candidates:
        try:
            fd = os.open(candidate, os.O_RDONLY)
        except OSError:
            continue
        st = os.fstat(fd)
        start = None if identity(st) in skip else resume_offset(fd, at, st.st_size)
        if start is not None:
            return candidate, fd, start, copy
        os.close(fd)
    return None


def find_inode(directory: Path, inode: int) -> Path | None:
    """The file in ``directory`` with inode number ``inode`` (a rotated file, renamed beside its path)."""
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.inode() == inode and entry.is_file(follow_symlinks=False):
                    return Path(entry.path)
    except OSError:
        return None
    return None


class Successors:
    """The files the followed path named after the one being read, opened, oldest first.

    Owned by the polling thread (the file source's).
    """

    def __init__(self, path: str, uri: str) -> None:
        self._path = path
        self._uri = uri
        self._waiting: deque[tuple[int, Identity, float]] = deque()  # descriptor, identity, seen at (wall clock)
        self._refused: set[Identity] = set()  # could not be opened: said once
        self._full = False  # MAX_WAITING files wait: said once

    def watch(self, current: Identity) -> None:
        """Open the file the path names now if it is neither ``current`` nor waiting already."""
        try:
            named = os.stat(self._path)
        except OSError:  # renamed away and not (yet) created anew
            return
        seen = identity(named)
        if seen == current or any(seen == waiting for _, waiting, _ in self._waiting):
            return
        if not stat.S_ISREG(named.st_mode):
            if seen not in self._refused:  # a directory, say: followed again once a file is back
                self._refused.add(seen)
                log.warning("%s names something that is not a regular file now; waiting for a file", self._uri)
            return
        if len(self._waiting) >= MAX_WAITING:
            if not self._full:
                log.warning(
                    "%s: %d rotated files wait to be read; a file the path names only until one is read is lost",
                    self._uri,
                    MAX_WAITING,
                )
            self._full = True
            return
        self._full = False
        try:
            fd = os.open(self._path, os.O_RDONLY)
        except OSError as exc:
            if seen not in self._refused:
                self._refused.add(seen)
                log.warning("%s names a new file that cannot be opened (%s); retrying", self._uri, exc.strerror)
            return
        if identity(os.fstat(fd)) != seen:  # rotated again between the stat and the open: next time
            os.close(fd)
            return
        self.push(fd, seen)

    def push(self, fd: int, seen: Identity) -> None:
        self._waiting.append((fd, seen, time.time()))

    def push_first(self, fd: int, seen: Identity) -> None:
        """``fd`` is read next (a file truncated after a copy, whose copy is read first)."""
        self._waiting.appendleft((fd, seen, time.time()))

    def due(self, reading: int) -> bool:
        """A successor waits, and the file being read (``reading``) was not written to for the grace
        since the successor was seen (its writer has moved on). By its modification time, not by
        when it was read: a reader far behind reads files written long ago, and does not wait."""
        if not self._waiting:
            return False
        return time.time() - max(os.fstat(reading).st_mtime, self._waiting[0][2]) >= ROTATION_GRACE_S

    def take(self) -> int:
        """The next file's descriptor; the caller owns it now."""
        return self._waiting.popleft()[0]

    def close(self) -> None:
        while self._waiting:
            os.close(self._waiting.popleft()[0])
