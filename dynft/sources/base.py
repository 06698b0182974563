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
import threading
from abc import ABC, abstractmethod
from collections import deque
from typing import Any

log = logging.getLogger(__name__)

Positions = dict[str, int]  # stream -> next position to read


class Record:
    """One raw record as it arrived: its bytes, its stream, the position after it, its key and headers.

    A plain slotted class: a record is made for every event on the ingest hot path.
    """

    __slots__ = ("headers", "key", "next", "raw", "stream", "where")

    def __init__(
        self,
        raw: bytes,
        stream: str,
        next: int,
        key: bytes | None = None,
        where: dict[str, Any] | None = None,
        headers: list[tuple[str, bytes | None]] | None = None,
    ) -> None:
        self.raw = raw
        self.stream = stream  # a Kafka partition ("topic/2"), a file ("file:x.jsonl"), "demo"
        self.next = next  # where to resume after this record
        self.key = key  # the message key, where the source has one
        self.where = where  # extra description for dead letters (line, offset, ...)
        self.headers = headers  # the message's own headers, where the source has them (a dead letter keeps them)

    @property
    def position(self) -> dict[str, Any]:
        return {"stream": self.stream, "next": self.next, **(self.where or {})}


def furthest(records: list[Record], into: Positions | None = None) -> Positions:
    """The largest ``next`` per stream among ``records`` (merged into ``into``)."""
    out: Positions = dict(into or {})
    for record in records:
        if record.next > out.get(record.stream, -1):
            out[record.stream] = record.next
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

    def at_end(self) -> bool:
        """After a poll that found nothing: whether this source's end was reached (a file at its
        end). A Kafka consumer may find nothing while behind, so it checks its end offsets."""
        return True

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


class RecordQueue:
    """A FIFO of records bounded by count and by raw bytes, moved in chunks: one lock round per poll.

    A record larger than ``max_bytes`` alone is still accepted into an empty queue, so that it
    can reach the decoder and be dead-lettered instead of blocking its stream.

    >>> q = RecordQueue(capacity=10, max_bytes=8)
    >>> q.offer([Record(b"abc", "s", 1), Record(b"defg", "s", 2), Record(b"hi", "s", 3)])
    2
    >>> q.nbytes, [r.raw for r in q.take(10, 0)], q.nbytes
    (7, [b'abc', b'defg'], 0)
    """

    def __init__(self, capacity: int, max_bytes: int = 1 << 62) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._chunks: deque[tuple[list[Record], int]] = deque()  # each with its raw bytes, summed once
        self._size = 0
        self._bytes = 0
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        """Raw bytes of the queued records."""
        return self._bytes

    def offer(self, records: list[Record]) -> int:
        """Queue as many of ``records`` as fit, in order; returns how many."""
        with self._cond:
            room = min(self.capacity - self._size, len(records))
            sizes = [len(r.raw) for r in records[:room]]
            nbytes = sum(sizes)
            if self._bytes + nbytes > self.max_bytes:  # the byte bound cuts the chunk short (rare)
                nbytes = 0
                for n, size in enumerate(sizes):
                    if self._bytes + nbytes + size > self.max_bytes and (n or self._size):
                        room = n
                        break
                    nbytes += size
            accepted = records[:room]  # a copy: the caller goes on to trim its own list
            if accepted:
                self._chunks.append((accepted, nbytes))
                self._size += len(accepted)
                self._bytes += nbytes
                self._cond.notify()
            return len(accepted)

    def take(self, max_records: int, timeout_s: float) -> list[Record]:
        """Up to ``max_records`` records, waiting up to ``timeout_s`` for the first."""
        with self._cond:
            if not self._size and not self._cond.wait_for(lambda: self._size > 0, timeout_s):
                return []
            out: list[Record] = []
            while self._chunks and len(out) < max_records:
                chunk, nbytes = self._chunks[0]
                want = max_records - len(out)
                if len(chunk) <= want:  # whole chunks: their bytes are known
                    self._chunks.popleft()
                    out.extend(chunk)
                    self._bytes -= nbytes
                else:
                    head = chunk[:want]
                    taken = sum([len(r.raw) for r in head])
                    self._chunks[0] = (chunk[want:], nbytes - taken)
                    out.extend(head)
                    self._bytes -= taken
            self._size -= len(out)
            return out

    def drop(self, streams: set[str]) -> int:
        """Remove the records of ``streams``; returns how many."""
        with self._cond:
            before = self._size
            kept = [r for chunk, _ in self._chunks for r in chunk if r.stream not in streams]
            self._size = len(kept)
            self._bytes = sum(len(r.raw) for r in kept)
            self._chunks = deque([(kept, self._bytes)]) if kept else deque()
            return before - self._size


class Intake:
    """Drains a source on its own thread into a queue bounded by records and by bytes.

    The thread never blocks on a full queue: it keeps what does not fit, pauses the source,
    and keeps polling (a Kafka consumer that stops polling loses its group membership). When
    the queue has room again the source is resumed. ``take`` returns what is queued. What the
    thread keeps is bounded too: it asks for no more records than a quarter of ``max_bytes``
    holds at the recent record size, and pauses once it holds a poll's worth of records or that
    quarter, so memory stays under about 1.5 x ``max_bytes``.
    """

    def __init__(self, source: Source, max_queued: int, poll_batch: int = 2048, max_bytes: int = 64 << 20) -> None:
        self.source = source
        self._queue = RecordQueue(max_queued, max_bytes)
        self._poll_batch = min(poll_batch, max_queued)
        self._pending_max_bytes = max(1, max_bytes // 4)
        self._pending: list[Record] = []  # polled, not yet queued; owned by the intake thread
        self._record_bytes = 256  # mean size of the last poll's records: sizes the next poll
        self.paused = False
        # The source had nothing more to give once (a poll that asked for records found none):
        # what was read before it was a backlog, what comes after it a feed (dynft.behind).
        self.dry = False
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
                full = self.paused or self._holding_enough()
                records = self.source.poll(0 if full else self._poll_size(), timeout_s=0.1)
                if records:
                    self._record_bytes = max(1, sum([len(r.raw) for r in records]) // len(records))
                elif not full and not self._pending and not self.dry:
                    self.dry = self.source.at_end()
                self._pending.extend(records)
                revoked = self.source.take_revoked()
                if revoked:
                    self._drop(revoked)
                if self._pending:
                    del self._pending[: self._queue.offer(self._pending)]
                # Hysteresis: pausing makes a Kafka consumer drop what it prefetched, so pause only
                # with a full poll waiting, and resume once the queue is half empty.
                if self._holding_enough() and not self.paused:
                    self.source.pause()
                    self.paused = True
                elif self.paused and not self._pending and self._queue_half_empty():
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

    def _poll_size(self) -> int:
        """A poll's worth of records, but no more bytes than the pending bound at the recent record size."""
        return max(1, min(self._poll_batch, self._pending_max_bytes // self._record_bytes))

    def _holding_enough(self) -> bool:
        """A full poll (by records or bytes) waits for room in the queue."""
        if len(self._pending) >= self._poll_batch:
            return True
        return sum(len(r.raw) for r in self._pending) >= self._pending_max_bytes

    def _queue_half_empty(self) -> bool:
        q = self._queue
        return len(q) <= q.capacity // 2 and q.nbytes <= q.max_bytes // 2

    def _drop(self, streams: set[str]) -> None:
        """Forget queued records of streams this consumer no longer owns: their new owner re-reads them."""
        kept = [r for r in self._pending if r.stream not in streams]
        dropped = len(self._pending) - len(kept) + self._queue.drop(streams)
        self._pending = kept
        log.info("dropped %d queued record(s) of revoked %s", dropped, ", ".join(sorted(streams)))

    def take(self, max_records: int, timeout_s: float) -> list[Record]:
        """Up to ``max_records`` queued records; waits up to ``timeout_s`` for the first."""
        return self._queue.take(max_records, timeout_s)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        return self._queue.nbytes

    @property
    def finished(self) -> bool:
        """The source is exhausted (or failed) and everything it gave has been taken."""
        return self._done.is_set() and not len(self._queue)

    @property
    def error(self) -> BaseException | None:
        return self._error

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self.source.close()
