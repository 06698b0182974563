"""JSON Lines from a file or from standard input, with an optional follow mode like ``tail -f``."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import stat
import sys
import time
import zlib
from pathlib import Path

from dynft.errors import SourceError
from dynft.sources.base import Record, Source
from dynft.sources.rotation import (
    CHECKED,
    INODE_BITS,
    LONGEST_CHECKED,
    Identity,
    Position,
    Successors,
    find_checkpointed,
    identity,
    parse,
    position_base,
    resume_offset,
    rotated_after,
    rotated_beside,
    with_check,
)

log = logging.getLogger(__name__)
CHUNK = 1 << 16
HEAD = 256  # bytes at the file's start remembered in follow mode: a file rewritten in place changes them
TAIL = 256  # and the last bytes read: a rewrite that kept the first ones changes these
BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark


class FileSource(Source):
    """Reads one record per line from ``path`` (``-`` for stdin); blank lines are skipped.

    Without ``follow`` the source is exhausted at end of file. With ``follow`` it keeps
    waiting for appended lines, and starts again from the top if the file is truncated or
    rewritten in place (its first bytes changed, even where it grew longer). A file renamed
    away and created anew (log rotation) is followed like ``tail -F``: the old file is read to
    its end, and once it has not grown for ``rotation.ROTATION_GRACE_S``, each file the path
    named since, in turn, from its start (``dynft.sources.rotation``). A restart resumes at the
    checkpoint's offset only in the file it was taken in (same inode, the same last bytes before
    it); in follow mode that file is looked for beside the path if it was rotated meanwhile, and
    its rest read first, then the files rotated after it. A UTF-8 byte order mark at the file's
    start is skipped. A regular file's positions are ``rotation.Position``s; a pipe's, offsets.

    Memory stays bounded whatever the input: a line longer than ``max_record_bytes`` is cut,
    its first ``max_record_bytes + 1`` bytes become its record (which the decoder rejects as
    ``record_too_large``; ``where["bytes"]`` gives the line's real length) and the rest is
    dropped as it is read, up to the next newline. Bytes are appended to one ``bytearray`` and
    searched for newlines once each, so a long line costs linear time, not quadratic. A poll
    returns once it holds ``max_poll_bytes``.
    """

    def __init__(
        self,
        path: str,
        follow: bool = False,
        poll_interval_s: float = 0.2,
        max_record_bytes: int = 1 << 20,
        max_poll_bytes: int = 16 << 20,
    ) -> None:
        self.uri = f"file:{path}"  # as it was given: what log lines and errors name
        # The stream its positions are kept under: the absolute path, so that a restart that names
        # the file otherwise (``./x``, an absolute path) resumes where the last run stopped instead
        # of training the whole file again.
        self.stream = self.uri if path == "-" else f"file:{os.path.abspath(path)}"
        self._path = path
        self._follow = follow
        self._poll_interval_s = poll_interval_s
        self._max_record_bytes = max_record_bytes
        self._max_poll_bytes = max_poll_bytes
        self._fd = -1  # not open
        self._buf = bytearray()  # bytes read after the last complete line
        self._scanned = 0  # _buf[:_scanned] holds no newline (searched already)
        self._cut = 0  # bytes of the first line in _buf dropped because it is over-long
        self._offset = 0  # bytes consumed into complete lines
        self._line: int | None = 0  # lines split off in this file; None after resuming mid-file (not counted)
        self._eof = False
        self._resume = 0  # the position to begin at (after a checkpoint)
        self._base = 0  # a regular file: its generation and inode, shifted (rotation.position_base)
        self._generation = 0
        self._head = b""  # follow mode: the file's first bytes as they were read
        self._tail = b""  # follow mode: the last bytes read, up to the read position
        self._consumed = b""  # the last bytes split off before _buf (checked by positions), b"" if unknown
        self._identity: Identity = (0, 0)  # a regular file: the one being read
        self._successors = Successors(path, self.uri)  # follow mode: files the path named since
        self._switch_due = False  # follow mode: the next read moves to the next successor
        self._after_end = False  # follow mode: the last read met the end of the file
        self._regular = True  # a regular file (set at open)
        self._missing = False  # follow mode: the path does not exist yet; it is waited for

    def resume_from(self, positions: dict[str, int]) -> None:
        if self._path == "-":
            return
        # A checkpoint's key may be spelled as it was given before keys were absolute paths.
        same = [k for k in positions if k.startswith("file:") and k != "file:-" and self._names_this(k[5:])]
        self._resume = positions.get(self.stream, max((positions[k] for k in same), default=0))
        others = sorted(k for k in positions if k.startswith("file:") and k not in same and k != self.stream)
        if not same and self.stream not in positions and others:
            log.warning(
                "%s: the checkpoint holds no position in this file (it read %s): reading it from its start",
                self.uri,
                ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else ""),
            )

    def _names_this(self, path: str) -> bool:
        return path != "-" and os.path.abspath(path) == self.stream[5:]

    def open(self) -> None:
        if self._path == "-":
            self._fd = sys.stdin.fileno()
            self._regular = False  # read as a stream even when redirected from a file: offsets, no pread
            return
        path = Path(self._path)
        if path.is_dir():
            raise SourceError(f"{self.uri}: is a directory, expected a JSON Lines file")
        try:
            # A FIFO's open waits for a writer, where no signal reaches it (Python retries it): one
            # without a writer yet held `dynft train` past its SIGTERM. Opened without waiting, it is
            # read only once select finds bytes or its writers gone (``_read``).
            fifo = stat.S_ISFIFO(os.stat(path).st_mode)
            self._fd = os.open(path, os.O_RDONLY | (os.O_NONBLOCK if fifo else 0))
        except FileNotFoundError as exc:
            if not self._follow:
                raise SourceError(f"{self.uri}: cannot open ({exc.strerror})") from exc
            self._await_path()
            return
        except OSError as exc:
            raise SourceError(f"{self.uri}: cannot open ({exc.strerror})") from exc
        self._missing = False
        opened = os.fstat(self._fd)
        self._regular = stat.S_ISREG(opened.st_mode)  # not a FIFO: it can be rewritten or rotated
        if self._regular:
            self._resume_reading(opened)
        if self._follow and self._regular:
            self._head = os.pread(self._fd, HEAD, 0)

    def _await_path(self) -> None:
        """Follow mode, the path missing (rotated away while stopped, or not created yet): read the
        rest of the checkpoint's file if it is beside the path, then wait for the path, as ``tail -F``."""
        at = parse(self._resume)
        if at.inode is not None and self._reopen_rotated(None, at):
            self._head = os.pread(self._fd, HEAD, 0)
            return
        if not self._missing:
            log.warning("%s does not exist; waiting for it to be created (source.follow)", self.uri)
        self._missing = True

    def _appeared(self, timeout_s: float) -> bool:
        """Follow mode, the path missing: whether it exists now (then it is open), else wait up to ``timeout_s``."""
        if Path(self._path).exists():
            self.open()
            if not self._missing:
                return True
        time.sleep(min(self._poll_interval_s, timeout_s))
        return False

    def _resume_reading(self, opened: os.stat_result) -> None:
        """Start after the checkpoint's position, in the file it was taken in; sets the generation."""
        at = parse(self._resume)
        if at.inode is not None and at.inode != opened.st_ino % (1 << INODE_BITS):
            if self._follow and self._reopen_rotated(opened, at):
                return
            log.warning(
                "%s is another file than the checkpoint's, which is not beside it (moved or compressed while stopped, "
                "or its inode number names another file now): reading it from the start; not read: the rest of the "
                "checkpoint's file, and these rotated files beside it: %s",
                self.uri,
                self._rotated_beside(),
            )
        else:
            start = resume_offset(self._fd, at, opened.st_size)
            if start is not None:
                self._generation = at.generation
                self._start_at(start)
                return
            if self._follow and self._reopen_rotated(opened, at):
                return
            log.warning(
                "%s does not go on at its checkpoint position (shorter, rewritten while stopped, or its inode number "
                "names another file now): reading it from the start; rotated files beside it, not read: %s",
                self.uri,
                self._rotated_beside(),
            )
        self._generation = at.generation + 1 if self._resume else 0  # past the checkpoint's: positions keep growing
        self._start_at(0)

    def _rotated_beside(self) -> str:
        """The rotated files beside the path, for a warning that they are not read."""
        return ", ".join(str(p) for p in rotated_beside(Path(self._path))) or "none"

    def _reopen_rotated(self, opened: os.stat_result | None, at: Position) -> bool:
        """Read the rest of the checkpoint's file first if it was rotated beside the path, then the
        files rotated after it, then the path's (``opened``; None: it is missing, and opened once created)."""
        skip = {identity(opened)} if opened is not None else set()
        checkpointed = find_checkpointed(Path(self._path), at, skip)
        if checkpointed is None:
            return False
        found, fd, start, copy = checkpointed
        later = rotated_after(Path(self._path), found, {*skip, identity(os.fstat(fd))})
        log.warning(
            "%s was %s while stopped; reading the rest of %s first, then %s",
            self.uri,
            "copied beside it, then truncated (copytruncate)" if copy else "rotated",
            found,
            ", ".join(str(p) for p in [*later, self._path]),
        )
        for rotated in later:
            with contextlib.suppress(OSError):  # gone meanwhile: nothing to read
                following = os.open(rotated, os.O_RDONLY)
                self._successors.push(following, identity(os.fstat(following)))
        if opened is not None:
            self._successors.push(self._fd, identity(opened))
        self._missing = False
        self._regular = True
        self._fd, self._generation = fd, at.generation + copy  # a copy's inode: positions must grow
        self._start_at(start)
        return True

    def _start_at(self, offset: int) -> None:
        """Read on from ``offset`` of the file open now, under the current generation."""
        os.lseek(self._fd, offset, os.SEEK_SET)
        self._buf, self._scanned, self._cut, self._offset = bytearray(), 0, 0, offset
        self._line = 0 if offset == 0 else None
        self._tail = b""
        self._consumed = os.pread(self._fd, min(CHECKED, offset), offset - min(CHECKED, offset))  # checked on
        opened = os.fstat(self._fd)
        self._identity = identity(opened)
        self._base = position_base(self._generation, opened.st_ino)

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        if self._missing and not self._appeared(timeout_s):
            return []
        if self._fd < 0:
            raise SourceError(f"{self.uri}: poll before open")
        if self._follow and self._regular:  # also while paused: a file rotated twice meanwhile is kept
            self._successors.watch(self._identity)
        out: list[Record] = []
        nbytes = 0
        deadline = time.monotonic() + timeout_s
        while len(out) < max_records:
            lines = self._split_lines(max_records - len(out))
            out.extend(lines)
            nbytes += sum(len(r.raw) for r in lines)
            if len(out) >= max_records or nbytes >= self._max_poll_bytes or self.exhausted:
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
            self._feed(chunk)
        return out

    def _feed(self, chunk: bytes) -> None:
        """Append bytes read; of a line longer than ``max_record_bytes`` keep only a prefix.

        Called only once every complete line has been split off, so ``_buf`` holds part of one line.
        """
        if self._cut:  # inside an over-long line: drop its bytes up to the newline that ends it
            end = chunk.find(b"\n")
            if end < 0:
                self._cut += len(chunk)
                return
            self._cut += end
            chunk = chunk[end:]
        self._buf += chunk
        keep = self._max_record_bytes + 1  # one byte more than allowed: the decoder rejects the record
        if not self._cut and len(self._buf) > keep and self._buf.find(b"\n", self._scanned) < 0:
            self._cut = len(self._buf) - keep
            del self._buf[keep:]
            self._scanned = keep

    def _read(self, timeout_s: float) -> bytes | None:
        """Bytes from the file, b"" at end of file, None when a pipe has nothing yet."""
        if self._path == "-" or not self._regular:
            ready, _, _ = select.select([self._fd], [], [], timeout_s)
            if not ready:
                return None
        if self._switch_due:
            self._switch()
        elif self._after_end:  # new bytes after an end of file may be a rewrite: look before reading on
            self._after_end = False
            self._restart_if_replaced()
        try:
            chunk = os.read(self._fd, CHUNK)
        except BlockingIOError:  # a FIFO select found ready and another reader emptied first
            return None
        if chunk and self._follow:
            self._tail = chunk[-TAIL:] if len(chunk) >= TAIL else (self._tail + chunk)[-TAIL:]
        return chunk

    def _at_end_of_file(self) -> None:
        if not self._follow or self._path == "-":
            if self._cut or (self._buf and not self._buf.isspace()):  # a last line without a newline counts
                self._buf += b"\n"
            self._eof = True
            return
        if self._regular:
            self._restart_if_replaced()
            self._after_end = True
            self._rotate_if_due()

    def _restart_if_replaced(self) -> None:
        """Read again from the top a file truncated (shorter than what was read) or rewritten in
        place (a rewrite that made it longer: its first bytes, or the last ones read, changed)."""
        read = self._offset + len(self._buf) + self._cut  # the read position
        head, tail = self._head, self._tail  # head: as read, kept for a copy read next
        if len(self._head) < HEAD and read > len(self._head):  # a file shorter than HEAD when opened
            self._head = os.pread(self._fd, min(HEAD, read), 0)
        if (
            os.fstat(self._fd).st_size < read
            or os.pread(self._fd, len(self._head), 0) != self._head
            or os.pread(self._fd, len(tail), read - len(tail)) != tail
        ):
            if self._read_copy_first(head):
                return
            unended = len(self._buf) + self._cut  # a last line without its newline yet: its bytes are gone
            log.warning(
                "%s was truncated or rewritten; reading it again from the start (no copy of the unread rest "
                "beside it; rotated files beside it, not read: %s; an unended last line lost: %d bytes)",
                self.uri,
                self._rotated_beside(),
                unended,
            )
            self._generation += 1
            self._start_at(0)
            self._head = os.pread(self._fd, HEAD, 0)

    def _read_copy_first(self, head: bytes) -> bool:
        """After a truncation: if the file was copied beside the path first (logrotate's ``copytruncate``),
        read the rest of the copy from where this file was left, then this file from its top. The copy
        is found as a restart finds one: by the bytes before the offset (``find_checkpointed``)."""
        here = Position(self._generation, None, self._offset, len(self._consumed), zlib.crc32(self._consumed))
        found = find_checkpointed(Path(self._path), here, {self._identity})
        if found is None:
            return False
        copy, fd, _, _ = found
        log.warning(
            "%s was truncated after a copy to %s (copytruncate): reading the rest of the copy first, then %s from "
            "its start",
            self.uri,
            copy,
            self._path,
        )
        self._successors.push_first(self._fd, self._identity)
        line, head = self._line, self._head
        self._fd = fd
        self._generation += 1  # the copy's positions come after the truncated file's
        self._start_at(self._offset)  # the partial line in _buf is read again from the copy
        self._line, self._head = line, head
        return True

    def _rotate_if_due(self) -> None:
        """At the end of the file being read: move on to the next file the path named, once this one
        has not grown for the grace (its writer has moved on)."""
        if not self._successors.due(self._fd):
            return
        if self._cut or (self._buf and not self._buf.isspace()):
            # The old file's last line, never ended by a newline: it counts (as at the end of a file not
            # followed), and is handed out before the new file is read.
            self._buf += b"\n"
        self._switch_due = True  # by the next read, once the lines before it are split off

    def _switch(self) -> None:
        """Read the next file the path named from its start (what is left unsplit is blank)."""
        os.close(self._fd)
        self._fd, self._switch_due = self._successors.take(), False
        self._generation += 1
        self._start_at(0)
        self._head = os.pread(self._fd, HEAD, 0)
        self._after_end = False
        log.warning("%s: reading the next file it named from its start (rotated or replaced)", self.uri)

    def _split_lines(self, limit: int) -> list[Record]:
        out: list[Record] = []
        buf, pos, floor = self._buf, 0, 0  # buf[floor:] and _consumed before it: the file's bytes in a row
        view = memoryview(buf)  # slices without copying; released before _buf is resized
        try:
            while len(out) < limit:
                end = buf.find(b"\n", max(pos, self._scanned))
                if end < 0:
                    self._scanned = len(buf)
                    break
                start = self._offset
                self._offset += end + 1 - pos + self._cut
                where = {"offset": start}
                if self._line is not None:  # unknown after a restart mid-file: not counted from the top
                    self._line += 1
                    where = {"line": self._line, "offset": start}
                if self._cut:
                    where["bytes"], self._cut = self._offset - start - 1, 0
                stop = end - 1 if end > pos and buf[end - 1] == 13 else end  # without a trailing \r
                line = bytes(view[pos:stop])
                # Editors on Windows start a file with one; not from a cut line, which must stay over the limit.
                if start == 0 and "bytes" not in where and line.startswith(BOM):
                    line = line[len(BOM) :]
                if "bytes" in where:  # a cut line (only ever the first): bytes are missing before its newline
                    floor, self._consumed = end + 1, self._read_back()
                if line and not line.isspace():
                    out.append(Record(line, self.stream, self._position(view, pos, end, floor, where), where=where))
                pos = end + 1
        finally:
            view.release()
        if pos:
            self._consumed = (self._consumed + bytes(buf[max(floor, pos - CHECKED) : pos]))[-CHECKED:]
            del buf[:pos]
            self._scanned = max(0, self._scanned - pos)
        return out

    def _position(self, view: memoryview, start: int, end: int, floor: int, where: dict[str, int]) -> int:
        """The position after the line ``view[start:end + 1]`` (``self._offset`` is after it already),
        with the CRC-32 of the whole line and at least ``CHECKED`` bytes before its end, where known."""
        if not self._regular:
            return self._offset
        if "bytes" in where:  # a cut line: its end is not in view, but read back from the file
            return with_check(self._base + self._offset, self._consumed)
        begin = min(start, end + 1 - CHECKED) if end - start < LONGEST_CHECKED else end + 1 - CHECKED
        begin = max(begin, floor - len(self._consumed))  # _consumed: the file's bytes before view[floor]
        if begin >= floor:
            return with_check(self._base + self._offset, view[begin : end + 1])
        return with_check(self._base + self._offset, self._consumed[begin - floor :] + view[floor : end + 1])

    def _read_back(self) -> bytes:
        """The file's last bytes before ``self._offset``, up to ``CHECKED`` (a cut line's end; b"" for a pipe)."""
        if not self._regular:
            return b""
        size = min(CHECKED, self._offset)
        return os.pread(self._fd, size, self._offset - size)

    @property
    def exhausted(self) -> bool:
        return self._eof and self._buf.find(b"\n", self._scanned) < 0

    def close(self) -> None:
        if self._fd >= 0 and self._path != "-":
            os.close(self._fd)
        self._successors.close()
        self._fd = -1
