"""Trying again after a failure: after ``first_s``, then twice as long each time, up to ``max_s``.

One mechanism for every retry that waits (a refused state disk, an unreadable Kafka partition, a
failed publish, a versions-topic sync); each owner keeps what it retries and says what failed.

>>> b = Backoff(1.0, 4.0)
>>> [b.failed(now=0.0) for _ in range(4)], b.failures
([1.0, 2.0, 4.0, 4.0], 4)
>>> b.due(now=3.9), b.due(now=4.0)
(False, True)
>>> b.reset(); b.failures, b.due(now=100.0), b.failed(now=100.0)
(0, False, 1.0)
"""

from __future__ import annotations

import time


class Backoff:
    """The waits of one thing that keeps failing; not thread-safe (its owner's thread, or a lock)."""

    def __init__(self, first_s: float, max_s: float) -> None:
        self.first_s, self.max_s = first_s, max_s
        self.failures = 0  # since the last reset
        self.delay = 0.0  # the last wait
        self.retry_at: float | None = None  # monotonic time of the next try (None: nothing failed)

    def failed(self, now: float | None = None) -> float:
        """One more failure; returns the seconds until the next try."""
        now = time.monotonic() if now is None else now
        self.delay = self.first_s if not self.failures else min(2 * self.delay, self.max_s)
        self.failures += 1
        self.retry_at = now + self.delay
        return self.delay

    def due(self, now: float | None = None) -> bool:
        """Whether something failed and its next try has come."""
        return self.retry_at is not None and (time.monotonic() if now is None else now) >= self.retry_at

    def reset(self) -> None:
        """It worked: the next failure waits ``first_s`` again."""
        self.failures, self.retry_at = 0, None
