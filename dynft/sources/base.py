"""The source interface every event source implements, and the intake thread that drains one.

A source hands out raw records (bytes plus where they came from); it does not parse them,
so that a record that cannot be parsed can still be dead-lettered byte for byte. Durable
sources (Kafka) learn through ``commit`` which positions are safely inside a checkpoint.
"""

from __future__ import annotations

import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    """One raw record as it arrived, and its position in the source (for commits and dead letters)."""

    raw: bytes
    position: dict[str, Any] = field(default_factory=dict)


class Source(ABC):
    """A stream of raw records.

    ``poll`` returns what is available within ``timeout_s`` (possibly nothing); ``exhausted``
    turns true once a finite source has handed out its last record; ``commit`` acknowledges
    records up to the given positions (a no-op for sources that cannot be replayed).
    """

    uri: str

    def open(self) -> None:  # noqa: B027 - optional hook
        """Acquire resources; called once before the first poll."""

    @abstractmethod
    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        """Up to ``max_records`` records, waiting at most ``timeout_s`` for the first one."""

    @property
    def exhausted(self) -> bool:
        """True once a finite source has nothing more to give."""
        return False

    def commit(self, positions: Sequence[dict[str, Any]]) -> None:  # noqa: B027 - optional hook
        """Acknowledge records up to these positions as durably processed."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; called once, also after errors."""


class Intake:
    """Drains a source on its own thread into a bounded queue.

    When the queue is full the thread blocks, which stops polling: that is the backpressure
    a pull-based source needs. ``take`` returns what is queued, waiting briefly for the first.
    """

    def __init__(self, source: Source, max_queued: int, poll_batch: int = 256) -> None:
        self.source = source
        self._queue: queue.Queue[Record] = queue.Queue(maxsize=max_queued)
        self._poll_batch = min(poll_batch, max_queued)
        self._stop = threading.Event()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="dynft-intake", daemon=True)

    def start(self) -> None:
        self.source.open()
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                records = self.source.poll(self._poll_batch, timeout_s=0.2)
                for record in records:
                    while not self._stop.is_set():
                        try:
                            self._queue.put(record, timeout=0.2)
                            break
                        except queue.Full:
                            continue
                if not records and self.source.exhausted:
                    break
        except BaseException as exc:  # reported through `error`; the loop decides what to do
            log.exception("source %s failed", self.source.uri)
            self._error = exc
        finally:
            self._done.set()

    def take(self, max_records: int, timeout_s: float) -> list[Record]:
        """Up to ``max_records`` queued records; waits up to ``timeout_s`` for the first."""
        out: list[Record] = []
        try:
            out.append(self._queue.get(timeout=timeout_s))
        except queue.Empty:
            return out
        while len(out) < max_records:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return out

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def finished(self) -> bool:
        """The source is exhausted (or failed) and everything it gave has been taken."""
        return self._done.is_set() and self._queue.empty()

    @property
    def error(self) -> BaseException | None:
        return self._error

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self.source.close()
