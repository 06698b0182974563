"""Dead-letter sinks: where rejected records go, byte for byte, with the reason.

The JSONL sink writes one object per rejected record::

    {"reason": "empty_text", "detail": "text is empty", "raw_b64": "...", "raw": "...",
     "origin": {"file": "in.jsonl", "line": 3}, "source": "file:in.jsonl", "at": "2026-..."}

``raw_b64`` is the exact bytes; ``raw`` is the same bytes as text when they are valid UTF-8.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from dynft.events import Rejection


class DeadLetterSink(Protocol):
    def write(self, rejection: Rejection, source: str, origin: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlDeadLetterSink:
    """Appends rejected records to a JSON Lines file, flushed after every write."""

    def __init__(self, path: Path, on_write: Callable[[Rejection], None] | None = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the sink's life
        self._lock = threading.Lock()
        self._on_write = on_write

    def write(self, rejection: Rejection, source: str, origin: dict[str, Any]) -> None:
        entry: dict[str, Any] = {
            "reason": rejection.reason,
            "detail": rejection.detail,
            "raw_b64": base64.b64encode(rejection.raw).decode("ascii"),
            "raw": _as_text(rejection.raw),
            "source": source,
            "origin": origin,
            "at": datetime.now(UTC).isoformat(),
        }
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
        if self._on_write is not None:
            self._on_write(rejection)

    def close(self) -> None:
        with self._lock:
            self._file.close()


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
