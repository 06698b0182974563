"""JSON Lines from a file or from standard input, with an optional follow mode like ``tail -f``."""

from __future__ import annotations

import logging
import os
import select
import sys
import time
from pathlib import Path

from dynft.errors import SourceError
from dynft.sources.base import Record, Source

log = logging.getLogger(__name__)
CHUNK = 1 << 16


class FileSource(Source):
    """Reads one record per line from ``path`` (``-`` for stdin); blank lines are skipped.

    Without ``follow`` the source is exhausted at end of file. With ``follow`` it keeps
    waiting for appended lines, and starts again from the top if the file is truncated.
    """

    def __init__(self, path: str, follow: bool = False, poll_interval_s: float = 0.2) -> None:
        self.uri = f"file:{path}"
        self._path = path
        self._follow = follow
        self._poll_interval_s = poll_interval_s
        self._fd = -1  # not open
        self._pending = b""
        self._offset = 0  # bytes consumed into complete lines
        self._line = 0
        self._eof = False
        self._start = 0  # byte offset to begin at (after a checkpoint)

    def resume_from(self, positions: dict[str, int]) -> None:
        if self._path != "-":
            self._start = positions.get(self.uri, 0)

    def open(self) -> None:
        if self._path == "-":
            self._fd = sys.stdin.fileno()
            return
        path = Path(self._path)
        if path.is_dir():
            raise SourceError(f"{self.uri}: is a directory, expected a JSON Lines file")
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise SourceError(f"{self.uri}: cannot open ({exc.strerror})") from exc
        if self._start:
            if self._start > os.fstat(self._fd).st_size:
                log.warning("%s is shorter than its checkpoint position; reading it from the start", self.uri)
            else:
                os.lseek(self._fd, self._start, os.SEEK_SET)
                self._offset = self._start

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        if self._fd < 0:
            raise SourceError(f"{self.uri}: poll before open")
        out: list[Record] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < max_records:
            out.extend(self._split_lines(max_records - len(out)))
            if len(out) >= max_records or self.exhausted:
                break
            chunk = self._read(max(0.0, deadline - time.monotonic()))
            if chunk is None:  # nothing now
                if out or time.monotonic() >= deadline:
                    break
                continue
            if chunk == b"":
                self._at_end_of_file()
                if self._eof:
                    continue  # split off a last line that had no newline, then stop
                if out or time.monotonic() >= deadline:
                    break
                time.sleep(min(self._poll_interval_s, max(0.0, deadline - time.monotonic())))
                continue
            self._pending += chunk
        return out

    def _read(self, timeout_s: float) -> bytes | None:
        """Bytes from the file, b"" at end of file, None when a pipe has nothing yet."""
        if self._path == "-":
            ready, _, _ = select.select([self._fd], [], [], timeout_s)
            if not ready:
                return None
        return os.read(self._fd, CHUNK)

    def _at_end_of_file(self) -> None:
        if not self._follow or self._path == "-":
            if self._pending.strip():  # a last line without a newline is still a record
                self._pending += b"\n"
            self._eof = True
            return
        size = os.fstat(self._fd).st_size
        if size < self._offset + len(self._pending):
            log.warning("%s was truncated; reading it again from the start", self.uri)
            os.lseek(self._fd, 0, os.SEEK_SET)
            self._pending, self._offset = b"", 0

    def _split_lines(self, limit: int) -> list[Record]:
        out: list[Record] = []
        while len(out) < limit:
            end = self._pending.find(b"\n")
            if end < 0:
                break
            line, self._pending = self._pending[:end], self._pending[end + 1 :]
            start = self._offset
            self._offset += end + 1
            self._line += 1
            line = line.rstrip(b"\r")
            if line.strip():
                out.append(Record(line, self.uri, self._offset, where={"line": self._line, "offset": start}))
        return out

    @property
    def exhausted(self) -> bool:
        return self._eof and b"\n" not in self._pending

    def close(self) -> None:
        if self._fd >= 0 and self._path != "-":
            os.close(self._fd)
        self._fd = -1
