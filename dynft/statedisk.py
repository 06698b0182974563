"""The state directory's file system: how much room it has, and whether writes there are refused.

A full disk is never the fault of the record being written: while the state directory refuses
writes, the training loop takes nothing more from its intake (so the source is paused once the
intake queue is full), keeps what it already has in memory, and tries the refused writes again
with a growing delay. ``StateDisk`` holds that state.

>>> disk = StateDisk(first_delay_s=1.0, max_delay_s=4.0)
>>> disk.refused(now=0.0)
1.0
>>> disk.refusing, disk.due(now=0.5), disk.due(now=1.0)
(True, False, True)
>>> disk.refused(now=1.0), disk.refused(now=3.0), disk.refused(now=7.0)
(2.0, 4.0, 4.0)
>>> disk.due(now=10.5), disk.due(now=11.0)
(False, True)
>>> disk.accepted(), disk.refusing
(True, False)
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
from pathlib import Path

from dynft.backoff import Backoff

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc``, or an error that caused it, is a write refused for want of space.

    Classified by type and code, never by message: an ``OSError`` with ENOSPC or EDQUOT, or an
    ``sqlite3.Error`` whose (extended) result code is SQLITE_FULL.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return True
        code = getattr(seen, "sqlite_errorcode", None) if isinstance(seen, sqlite3.Error) else None
        if isinstance(code, int) and code & 0xFF == sqlite3.SQLITE_FULL:
            return True
        seen = seen.__cause__
    return False


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged process may still write on the file system holding ``path``.

    ``path`` may not exist yet: its nearest existing parent is measured.
    """
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    st = os.statvfs(probe)
    return st.f_bavail * st.f_frsize


class StateDisk:
    """Whether writes to the state directory are being refused, and when to try them again.

    Shared by two threads, each doing what it owns: the batching thread (which writes dead
    letters) and the main thread (ledger commits, checkpoints) call ``refused``; the batching
    thread reads ``refusing`` before each take from the intake; the main thread asks ``due`` and
    calls ``accepted`` once a checkpoint, with its dead-letter flush and ledger commit, went
    through. A lock guards the few fields; nothing blocks while holding it.
    """

    def __init__(self, first_delay_s: float = 1.0, max_delay_s: float = 30.0) -> None:
        self._lock = threading.Lock()
        self._backoff = Backoff(first_delay_s, max_delay_s)  # under the lock

    @property
    def refusing(self) -> bool:
        return self._backoff.failures > 0

    def refused(self, now: float | None = None) -> float:
        """A write was refused: hold intake; returns the delay before the next try."""
        with self._lock:
            return self._backoff.failed(now)

    def write_refused(self, exc: OSError) -> None:
        """``on_refused`` of the dead-letter file (batching thread): hold intake; the sink keeps the entry."""
        self.refused()

    def due(self, now: float | None = None) -> bool:
        """Whether the refused writes should be tried again now (always, while none is refused)."""
        with self._lock:
            return not self._backoff.failures or self._backoff.due(now)

    def accepted(self) -> bool:
        """The refused writes went through; returns whether writes had been refused until now."""
        with self._lock:
            was = self._backoff.failures > 0
            self._backoff.reset()
        return was
