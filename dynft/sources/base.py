"""The source interface every event source implements, and the intake thread that drains one.

A source hands out raw records (bytes plus where they came from); it does not parse them,
so that a record that cannot be parsed can still be dead-lettered byte for byte.

Every record's position names its *stream* (a Kafka partition, a file) and the *next*
position to read after it. The training loop collects the positions of the records it has
fully processed and, once they are inside a durable checkpoint, hands the source the
furthest ``next`` per stream through ``commit``; after a restart ``resume_from`` receives
the same summary from the checkpoint. That is the at-least-once contract.
"""

from __future__ import annotations

import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

Positions = dict[str, int]  # stream -> next position to read


@dataclass(frozen=True)
class Record:
    """One raw record as it arrived, and its position (``stream`` and ``next`` at least)."""

    raw: bytes
    position: dict[str, Any] = field(default_factory=dict)
    key: bytes | None = None  # the message key, where the source has one

    @property
    def stream(self) -> str:
        return str(self.position.get("stream", ""))


def furthest(positions: list[dict[str, Any]], into: Positions | None = None) -> Positions:
    """The largest ``next`` per stream among ``positions`` (merged into ``into``)."""
    out: Positions = dict(into or {})
    for pos in positions:
        stream, nxt = pos.get("stream"), pos.get("next")
        if isinstance(stream, str) and isinstance(nxt, int) and nxt > out.get(stream, -1):
            out[stream] = nxt
    return out


class Source(ABC):
    """A stream of raw records.

    ``poll`` returns what is available within ``timeout_s`` (possibly nothing; with
    ``max_records == 0`` it only keeps the source alive). ``exhausted`` turns true once a
    finite source has handed out its last record. ``pause``/``resume`` stop and restart
    fetching without leaving a consumer group. ``commit`` may be called from another thread.
    """

    uri: str

    def resume_from(self, positions: Positions) -> None:  # noqa: B027 - optional hook
        """Start after these positions (from a checkpoint); called before ``open``."""

    def open(self) -> None:  # noqa: B027 - optional hook
        """Acquire resources; called once before the first poll."""

    @abstractmethod
    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        """Up to ``max_records`` records, waiting at most ``timeout_s`` for the first one."""

    @property
    def exhausted(self) -> bool:
        """True once a finite source has nothing more to give."""
        return False

    def pause(self) -> None:  # noqa: B027 - optional hook
        """Stop fetching (backpressure); ``poll`` is still called to keep the source alive."""

    def resume(self) -> None:  # noqa: B027 - optional hook
        """Fetch again after ``pause``."""

    def take_revoked(self) -> set[str]:
        """Streams taken away since the last call (their queued records must be dropped)."""
        return set()

    def commit(self, positions: Positions) -> None:  # noqa: B027 - optional hook
        """Acknowledge every record before these positions as durably processed."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; called once, also after errors."""


class Intake:
    """Drains a source on its own thread into a bounded queue.

    The thread never blocks on a full queue: it keeps what does not fit, pauses the source,
    and keeps polling (a Kafka consumer that stops polling loses its group membership). When
    the queue has room again the source is resumed. ``take`` returns what is queued.
    """

    def __init__(self, source: Source, max_queued: int, poll_batch: int = 512) -> None:
        self.source = source
        self._queue: queue.Queue[Record] = queue.Queue(maxsize=max_queued)
        self._poll_batch = min(poll_batch, max_queued)
        self._pending: deque[Record] = deque()
        self.paused = False
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
                records = self.source.poll(0 if self.paused else self._poll_batch, timeout_s=0.1)
                self._pending.extend(records)
                revoked = self.source.take_revoked()
                if revoked:
                    self._drop(revoked)
                self._deliver()
                if self._pending and not self.paused:
                    self.source.pause()
                    self.paused = True
                elif not self._pending and self.paused:
                    self.source.resume()
                    self.paused = False
                if self.paused:
                    self._stop.wait(0.02)
                elif not records and not self._pending and self.source.exhausted:
                    break
        except BaseException as exc:  # reported through `error`; the loop decides what to do
            log.exception("source %s failed", self.source.uri)
            self._error = exc
        finally:
            self._done.set()

    def _deliver(self) -> None:
        while self._pending:
            try:
                self._queue.put_nowait(self._pending[0])
            except queue.Full:
                return
            self._pending.popleft()

    def _drop(self, streams: set[str]) -> None:
        """Forget queued records of streams this consumer no longer owns: their new owner re-reads them."""
        kept = [r for r in self._pending if r.stream not in streams]
        dropped = len(self._pending) - len(kept)
        self._pending = deque(kept)
        with self._queue.mutex:
            before = len(self._queue.queue)
            self._queue.queue = deque(r for r in self._queue.queue if r.stream not in streams)
            dropped += before - len(self._queue.queue)
            self._queue.not_full.notify_all()
        log.info("dropped %d queued record(s) of revoked %s", dropped, ", ".join(sorted(streams)))

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
