"""Dead-letter sinks: where rejected records go, byte for byte, with the reason.

The JSONL sink (file sources, the demo) writes one object per rejected record::

    {"reason": "empty_text", "detail": "text is empty", "raw_b64": "...", "raw": "...",
     "origin": {"stream": "file:in.jsonl", "line": 3, ...}, "source": "file:in.jsonl", "at": "2026-..."}

``raw_b64`` is the exact bytes; ``raw`` is the same bytes as text when they are valid UTF-8 and
at most ``RAW_TEXT_MAX`` bytes (else null: a record of a megabyte would be stored twice).

The Kafka sink (Kafka sources) produces the original bytes, with the original key and headers, to
``<topic><suffix>`` (default ``<topic>.dlq``) with headers ``dynft.reason``, ``dynft.detail``,
``dynft.source.topic``, ``dynft.source.partition`` and ``dynft.source.offset`` (see
``dynft.sources.kafka_deadletter``).

Both are durable after ``flush``, which the training loop calls before each checkpoint.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from dynft.durable import fsync_dir
from dynft.errors import StateCorruptError
from dynft.events import Rejection
from dynft.settings import KafkaSettings, SourceSettings
from dynft.sources.base import Record, Source

log = logging.getLogger(__name__)


class DeadLetterSink(Protocol):
    where: str  # for people: the file or the topics the letters go to

    def write(self, rejection: Rejection, record: Record) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class JsonlDeadLetterSink:
    """Appends rejected records to a JSON Lines file, rotated by size like logrotate.

    Before a line would take the file past ``max_bytes`` the file is fsynced and rotated:
    ``dead-letter.jsonl`` becomes ``.1``, ``.1`` becomes ``.2`` and so on; ``.<max_files>`` is
    deleted. A line larger than ``max_bytes`` gets a file of its own. So at most ``max_files + 1``
    files of about ``max_bytes`` each, and the newest entries are always kept.

    A write the disk refuses (full, read-only) is kept in memory and tried again at the next
    write and at ``flush``, and a line it left half-written is cut off, so the file only ever
    holds whole lines; ``on_refused`` is told, so that the training loop stops taking input
    until the disk takes writes again (the memory held stays bounded). ``flush`` raises while
    any entry is still unwritten: the checkpoint that would commit those records' positions
    fails instead. Nothing is lost: if the process ends first, the positions were never
    committed and the records are read (and rejected) again.
    """

    def __init__(
        self,
        path: Path,
        source: str,
        max_bytes: int = 64 << 20,
        max_files: int = 4,
        on_refused: Callable[[OSError], None] | None = None,
    ) -> None:
        self.path = path
        self.where = str(path)
        self.source = source
        self.max_bytes = max_bytes
        self.max_files = max_files
        self._on_refused = on_refused
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():  # the same tomorrow: a state error (exit 2), not a failure to restart on
            raise StateCorruptError(f"dead-letter file {path}: a directory; move it aside")
        self._fd = self._open()
        self._pending: list[bytes] = []  # whole lines the disk has not taken yet
        self._lock = threading.Lock()  # write (batching thread) and flush/close (main thread)

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._size = os.fstat(fd).st_size
        return fd

    def write(self, rejection: Rejection, record: Record) -> None:
        entry: dict[str, Any] = {
            "reason": rejection.reason,
            "detail": rejection.detail,
            "raw_b64": base64.b64encode(rejection.raw).decode("ascii"),
            "raw": _as_text(rejection.raw),
            "source": self.source,
            "origin": record.position,
            "at": datetime.now(UTC).isoformat(),
        }
        # "backslashreplace": a lone surrogate (a file name that is not UTF-8, say) can only sit
        # inside a JSON string here, where its escape reads back as the same character.
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")
        with self._lock:
            self._pending.append(line)
            try:
                self._drain()
            except OSError as exc:
                if len(self._pending) == 1:  # once per outage, not once per record
                    log.error(
                        "dead-letter file %s: %s; keeping rejected records in memory until it takes them",
                        self.path,
                        exc,
                    )
                if self._on_refused is not None:
                    self._on_refused(exc)

    @property
    def backlog(self) -> int:
        """Entries the disk has not taken yet."""
        return len(self._pending)

    def _drain(self) -> None:
        while self._pending:
            line = self._pending[0]
            if self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
            self._append(line)
            self._pending.pop(0)

    def _append(self, line: bytes) -> None:
        end = os.lseek(self._fd, 0, os.SEEK_END)
        view = memoryview(line)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, end)  # no half line: the retry writes it whole
            raise
        self._size = end + len(line)

    def _rotate(self) -> None:
        """``path`` -> ``path.1`` -> ... -> ``path.<max_files>`` (deleted); a new empty ``path``.

        The full file is fsynced first: its entries stay as durable as ``flush`` made them.
        """
        os.fsync(self._fd)
        if self.path.exists():  # else the files were shifted already, by a try whose _open failed
            rotated = [self.path.with_name(f"{self.path.name}.{n}") for n in range(self.max_files + 1)]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(rotated[self.max_files])
            for n in range(self.max_files - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(rotated[n], rotated[n + 1])
            os.rename(self.path, rotated[1])
        fd = self._open()  # before closing the old one: a failure leaves the sink writing the old file
        os.close(self._fd)
        self._fd = fd
        fsync_dir(self.path.parent)

    def flush(self) -> None:
        """Make every entry durable; raises ``OSError`` while the disk refuses some."""
        with self._lock:
            try:
                self._drain()
                os.fsync(self._fd)
            except OSError as exc:  # the same error, naming the file (the checkpoint's log line shows it)
                raise OSError(exc.errno, exc.strerror, str(self.path)) from exc

    def close(self) -> None:
        with self._lock:
            try:
                self._drain()
                os.fsync(self._fd)
            except OSError as exc:
                log.error(
                    "dead-letter file %s: %d rejected records not written (%s); their positions were not "
                    "committed, so they are read again at the next start",
                    self.path,
                    len(self._pending),
                    exc,
                )
            finally:
                os.close(self._fd)


def open_dead_letter_sink(
    source: Source,
    kafka: KafkaSettings,
    path: Path,
    settings: SourceSettings | None = None,
    on_refused: Callable[[OSError], None] | None = None,
) -> DeadLetterSink:
    """Kafka sources dead-letter to topics; every other source to a JSON Lines file."""
    from dynft.sources.kafka import KafkaSource
    from dynft.sources.kafka_deadletter import KafkaDeadLetterSink
    from dynft.sources.kafka_process import KafkaProcessSource

    s = settings or SourceSettings()
    local = JsonlDeadLetterSink(path, source.uri, s.dead_letter_max_bytes, s.dead_letter_max_files, on_refused)
    if isinstance(source, KafkaSource | KafkaProcessSource):  # the file takes what the topic refuses for good
        return KafkaDeadLetterSink(source.servers, source.topics, kafka, fallback=local)
    return local


RAW_TEXT_MAX = 64 << 10


def _as_text(raw: bytes) -> str | None:
    if len(raw) > RAW_TEXT_MAX:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def dead_letter_files(path: Path) -> list[Path]:
    """The dead-letter file and its rotated predecessors that exist, oldest first."""
    rotated = sorted(
        (p for p in path.parent.glob(f"{path.name}.*") if p.name[len(path.name) + 1 :].isdigit()),
        key=lambda p: int(p.name[len(path.name) + 1 :]),
        reverse=True,
    )
    return rotated + ([path] if path.exists() else [])


def read_dead_letters(path: Path) -> list[dict[str, Any]]:
    """Every entry of a JSONL dead-letter file, with ``raw`` restored as bytes under ``raw_bytes``."""
    entries = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            entry = json.loads(line)
            entry["raw_bytes"] = base64.b64decode(entry["raw_b64"])
            entries.append(entry)
    return entries
