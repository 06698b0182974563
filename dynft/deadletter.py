"""Dead-letter sinks: where rejected records go, byte for byte, with the reason.

The JSONL sink (file sources, the demo) writes one object per rejected record::

    {"reason": "empty_text", "detail": "text is empty", "raw_b64": "...", "raw": "...",
     "origin": {"stream": "file:in.jsonl", "line": 3, ...}, "source": "file:in.jsonl", "at": "2026-..."}

``raw_b64`` is the exact bytes; ``raw`` is the same bytes as text when they are valid UTF-8.

The Kafka sink (Kafka sources) produces the original bytes, with the original key, to
``<topic><suffix>`` (default ``<topic>.dlq``) with headers ``dynft.reason``, ``dynft.detail``,
``dynft.source.topic``, ``dynft.source.partition`` and ``dynft.source.offset``.

Both are durable after ``flush``, which the training loop calls before each checkpoint.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from dynft.errors import SourceError
from dynft.events import Rejection
from dynft.settings import KafkaSettings
from dynft.sources.base import Record, Source

log = logging.getLogger(__name__)


class DeadLetterSink(Protocol):
    def write(self, rejection: Rejection, record: Record) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class JsonlDeadLetterSink:
    """Appends rejected records to a JSON Lines file.

    A write the disk refuses (full, read-only) is kept in memory and tried again at the next
    write and at ``flush``, and a line it left half-written is cut off, so the file only ever
    holds whole lines. ``flush`` raises while any entry is still unwritten: the checkpoint that
    would commit those records' positions fails instead, and the trainer keeps going. Nothing is
    lost: if the process ends first, the positions were never committed and the records are
    read (and rejected) again.
    """

    def __init__(self, path: Path, source: str) -> None:
        self.path = path
        self.source = source
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._pending: list[bytes] = []  # whole lines the disk has not taken yet
        self._lock = threading.Lock()

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

    def _drain(self) -> None:
        while self._pending:
            self._append(self._pending[0])
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

    def flush(self) -> None:
        """Make every entry durable; raises ``OSError`` while the disk refuses some."""
        with self._lock:
            self._drain()
            os.fsync(self._fd)

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


class KafkaDeadLetterSink:
    """Produces rejected records to ``<topic><suffix>``, creating that topic if it is missing."""

    def __init__(self, servers: list[str], topics: list[str], suffix: str, client: dict[str, Any]) -> None:
        from kafka import KafkaAdminClient, KafkaProducer
        from kafka.errors import KafkaError

        self.suffix = suffix
        try:
            admin = KafkaAdminClient(bootstrap_servers=servers, **client)
            try:
                wanted = {f"{t}{suffix}": {"num_partitions": 1, "replication_factor": -1} for t in topics}
                admin.create_topics(wanted, raise_errors=False)
            finally:
                admin.close()
            self._producer = KafkaProducer(bootstrap_servers=servers, acks="all", linger_ms=5, **client)
        except KafkaError as exc:
            raise SourceError(f"cannot set up the dead-letter topics on {','.join(servers)}: {exc}") from exc

    def write(self, rejection: Rejection, record: Record) -> None:
        topic, _, partition = record.stream.rpartition("/")
        headers = [
            ("dynft.reason", rejection.reason.encode()),
            ("dynft.detail", rejection.detail.encode()),
            ("dynft.source.topic", topic.encode()),
            ("dynft.source.partition", partition.encode()),
            ("dynft.source.offset", str(record.next - 1).encode()),
        ]
        self._producer.send(f"{topic}{self.suffix}", value=rejection.raw, key=record.key, headers=headers)

    def flush(self) -> None:
        self._producer.flush()

    def close(self) -> None:
        try:
            self._producer.flush()
        finally:  # a failed flush still releases the producer's sockets
            self._producer.close()


def open_dead_letter_sink(source: Source, kafka: KafkaSettings, path: Path) -> DeadLetterSink:
    """Kafka sources dead-letter to topics; every other source to a JSON Lines file."""
    from dynft.sources.kafka import KafkaSource, client_config

    if isinstance(source, KafkaSource):
        return KafkaDeadLetterSink(source.servers, source.topics, kafka.dlq_suffix, client_config(kafka))
    return JsonlDeadLetterSink(path, source.uri)


def _as_text(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def read_dead_letters(path: Path) -> list[dict[str, Any]]:
    """Every entry of a JSONL dead-letter file, with ``raw`` restored as bytes under ``raw_bytes``."""
    entries = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            entry = json.loads(line)
            entry["raw_bytes"] = base64.b64decode(entry["raw_b64"])
            entries.append(entry)
    return entries
