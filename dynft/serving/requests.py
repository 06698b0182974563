"""The inference engine's waiting requests: whole, first in first out, bounded by texts and by time.

Requests are put by the event loop (``InferenceEngine.submit``) and taken by the inference worker
(``collect``), both under ``cond``, which the version watcher also notifies to wake the worker for
a swap. A request is refused (``Overloaded``) when ``server.max_queue`` texts already wait, or when
the work queued before it would take the worker longer than ``server.request_timeout_s`` at its
measured throughput: a 503 at once instead of a 504 after the timeout. A request withdrawn while
it waits (its client gone, or timed out: its future cancelled) holds no place and is never taken.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from dynft.serving.answers import Overloaded, Pending
from dynft.settings.sections import ServerSettings

WARM_UP_ROUNDS = 2  # the first full rounds (first allocations, kernel choice) say little of the next ones


class RequestQueue:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.cond = threading.Condition()
        self._queue: deque[Pending] = deque()
        self.texts = 0  # texts in the queue (under cond; those of a micro-batch being collected are out)
        self.texts_per_s = 0.0  # the worker's throughput, 0 until measured (the worker writes one float)
        self._rounds = 0  # full rounds measured (the worker's)

    def put(self, pending: Pending) -> None:
        """Queue ``pending``, or raise ``Overloaded`` saying why it cannot wait."""
        s, n = self.settings, len(pending.texts)
        with self.cond:
            rate = self.texts_per_s
            if self.texts + n > s.max_queue or (rate and self.texts / rate > s.request_timeout_s):
                self._drop_withdrawn()
            if self.texts + n > s.max_queue:
                raise Overloaded(f"{self.texts} texts are already waiting")
            if rate and self.texts / rate > s.request_timeout_s:  # the work before it: an empty queue takes any
                raise Overloaded(
                    f"{self.texts} texts are already waiting, about {self.texts / rate:.0f} s of work at "
                    f"{rate:.0f} texts/s (server.request_timeout_s is {s.request_timeout_s:g})"
                )
            self._queue.append(pending)
            self.texts += n
            self.cond.notify()

    def collect(self) -> list[Pending]:
        """Whole requests for one micro-batch (empty when woken for a swap or a stop)."""
        s = self.settings
        with self.cond:
            if not self._queue:
                self.cond.wait(timeout=0.5)
            self._skip_withdrawn()
            if not self._queue:
                return []
            deadline = time.monotonic() + s.max_wait_ms / 1000
            batch = [self._take()]
            size = len(batch[0].texts)
            while size < s.max_batch:
                self._skip_withdrawn()
                if self._queue:
                    if size + len(self._queue[0].texts) > s.max_batch:
                        break
                    batch.append(self._take())
                    size += len(batch[-1].texts)
                    continue
                # A staged version waits for the batch too (at most max_wait_ms): cutting batches
                # short for swaps halved them, and throughput, at fifty promotions a second.
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.cond.wait(timeout=remaining)  # a put meanwhile sees the queue without this batch
            return batch

    def _take(self) -> Pending:
        pending = self._queue.popleft()
        self.texts -= len(pending.texts)
        return pending

    def drain(self) -> list[Pending]:
        """Every request still waiting, taken out (at a stop)."""
        with self.cond:
            out, self._queue, self.texts = list(self._queue), deque(), 0
            return out

    def measure(self, texts: int, seconds: float) -> None:
        """The worker's throughput, from the forward passes of rounds of at least half a micro-batch
        (a queue long enough to refuse for is worked off in full ones; much smaller rounds would
        understate it), after ``WARM_UP_ROUNDS`` of them."""
        if texts * 2 < self.settings.max_batch or seconds <= 0:
            return
        self._rounds += 1
        if self._rounds <= WARM_UP_ROUNDS:
            return
        rate = texts / seconds
        self.texts_per_s = rate if not self.texts_per_s else 0.8 * self.texts_per_s + 0.2 * rate

    def _skip_withdrawn(self) -> None:
        while self._queue and self._queue[0].future.cancelled():
            self.texts -= len(self._queue.popleft().texts)

    def _drop_withdrawn(self) -> None:
        kept = deque(p for p in self._queue if not p.future.cancelled())
        self.texts = sum(len(p.texts) for p in kept)
        self._queue = kept
