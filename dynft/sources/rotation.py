"""Log rotation for the file source's follow mode: the files a path names in turn, and where a
restart resumes.

A rotated file (renamed, created anew) is read to its end before its successor; a file rotated
again before the reader reached it must not be skipped, so every file the path names is opened
as soon as it is seen (an open descriptor keeps a renamed or deleted file readable) and read in
the order seen. After a restart, the checkpoint's file is found again by its inode in the path's
directory (logrotate renames within it), so that its rest is read before the file the path names now.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections import deque
from pathlib import Path

log = logging.getLogger(__name__)

ROTATION_GRACE_S = 2.0  # a rotated file's writer may append for a moment before it reopens the path
MAX_WAITING = 64  # successors held open at most; beyond, the path is looked at again once one is read

Identity = tuple[int, int]  # (device, inode)


def identity(st: os.stat_result) -> Identity:
    return st.st_dev, st.st_ino


def line_start(fd: int, offset: int, size: int) -> int | None:
    """``offset`` where it can be where a line starts in the file (after a newline), else None.

    A checkpoint's offset always follows a newline, except after a last line that had none: that
    offset is one past the file's end (the line counts its missing newline), and reading goes on at
    the end. Anything else means the bytes before it changed (the file was rewritten while dynft was
    stopped, or its inode number went to another file), and the offset means nothing in it.
    """
    if offset == 0:
        return 0
    if offset <= size:
        return offset if os.pread(fd, 1, offset - 1) == b"\n" else None
    if offset == size + 1 and size and os.pread(fd, 1, size - 1) != b"\n":
        return size
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
        self._waiting: deque[tuple[int, Identity, float]] = deque()  # descriptor, identity, seen at
        self._refused: set[Identity] = set()  # could not be opened: said once

    def __len__(self) -> int:
        return len(self._waiting)

    def watch(self, current: Identity) -> None:
        """Open the file the path names now if it is neither ``current`` nor waiting already."""
        try:
            named = os.stat(self._path)
        except OSError:  # renamed away and not (yet) created anew
            return
        seen = identity(named)
        if seen == current or any(seen == waiting for _, waiting, _ in self._waiting):
            return
        if not stat.S_ISREG(named.st_mode) or len(self._waiting) >= MAX_WAITING:
            return
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
        self._waiting.append((fd, seen, time.monotonic()))

    def due(self, grew_at: float) -> bool:
        """A successor waits, and the file being read has not grown for the grace since it was seen."""
        if not self._waiting:
            return False
        return time.monotonic() - max(grew_at, self._waiting[0][2]) >= ROTATION_GRACE_S

    def take(self) -> int:
        """The next file's descriptor; the caller owns it now."""
        return self._waiting.popleft()[0]

    def close(self) -> None:
        while self._waiting:
            os.close(self._waiting.popleft()[0])
