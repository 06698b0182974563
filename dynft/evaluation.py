"""Prequential (test-then-train) metrics and the held-out window the promotion gate scores on.

Every fresh event is predicted before it is trained on; ``Prequential`` keeps rolling accuracy,
macro-F1 and loss over the last ``window`` events, plus the majority-class rate of the same
window as the baseline a classifier must beat.

A deterministic share of events (by a hash of their id and text, so a redelivered event goes the
same way, and a producer that reuses one id for every event still has a share held out) is never
trained on: those go to the ``HoldoutWindow``.

>>> pq = Prequential(window=4)
>>> for truth, pred in [("a", "a"), ("a", "b"), ("b", "b"), ("a", "a")]:
...     pq.update(truth, pred, loss=0.5)
>>> pq.accuracy, pq.majority_rate
(0.75, 0.75)
"""

from __future__ import annotations

import threading
import zlib
from collections import Counter, deque
from typing import Any

from river import metrics, stats, utils

from dynft.events import Event


class Prequential:
    """Rolling prequential accuracy, macro-F1, loss and majority-class rate."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._accuracy = utils.Rolling(metrics.Accuracy, window_size=window)
        self._f1 = utils.Rolling(metrics.MacroF1, window_size=window)
        self._loss = utils.Rolling(stats.Mean, window_size=window)
        self._truths: deque[str] = deque(maxlen=window)
        self._truth_counts: Counter[str] = Counter()
        self._recent: deque[tuple[str, str | None, float]] = deque(maxlen=window)
        self.seen = 0

    def snapshot(self) -> dict[str, Any]:
        return {"seen": self.seen, "recent": list(self._recent)}

    def restore(self, state: dict[str, Any]) -> None:
        """Rebuild the rolling window from a ``snapshot`` (the metrics are exact again)."""
        for truth, prediction, loss in state["recent"]:
            self.update(truth, prediction, loss)
        self.seen = state["seen"]

    def update(self, truth: str, prediction: str | None, loss: float) -> None:
        self._accuracy.update(truth, prediction)
        self._f1.update(truth, prediction)
        self._loss.update(loss)
        if len(self._truths) == self.window:
            self._truth_counts[self._truths[0]] -= 1
        self._truths.append(truth)
        self._truth_counts[truth] += 1
        self._recent.append((truth, prediction, loss))
        self.seen += 1

    @property
    def accuracy(self) -> float:
        return float(self._accuracy.get())

    @property
    def macro_f1(self) -> float:
        return float(self._f1.get())

    @property
    def loss(self) -> float:
        return float(self._loss.get())

    @property
    def majority_rate(self) -> float:
        """Accuracy of always answering the window's most frequent label."""
        if not self._truths:
            return 0.0
        return max(self._truth_counts.values()) / len(self._truths)


def is_held_out(event_id: str, text: str, fraction: float) -> bool:
    """Whether an event belongs to the held-out share; stable for a given id and text.

    >>> is_held_out("e1", "some text", 0.0), is_held_out("e1", "some text", 0.999999)
    (False, True)
    """
    if fraction <= 0:
        return False
    # crc32 is stable across processes, unlike hash(). "surrogatepass": hashing never raises,
    # whatever the strings hold (decode refuses lone surrogates, but this must not depend on it).
    digest = zlib.crc32(text.encode("utf-8", "surrogatepass"), zlib.crc32(event_id.encode("utf-8", "surrogatepass")))
    return digest / 2**32 < fraction


class HoldoutWindow:
    """The most recent held-out events (thread-safe); none of them is ever trained on."""

    def __init__(self, size: int) -> None:
        self._events: deque[Event] = deque(maxlen=size)
        self._lock = threading.Lock()
        self.revision = 0  # changes whenever the window does

    def add(self, event: Event) -> None:
        with self._lock:
            self._events.append(event)
            self.revision += 1

    def snapshot(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    def restore(self, events: list[Event]) -> None:
        with self._lock:
            self._events.extend(events)
            self.revision += 1

    def clear(self) -> None:
        """Forget every event (they belong to an old concept: ``dynft.reaction``)."""
        with self._lock:
            self._events.clear()
            self.revision += 1

    def __len__(self) -> int:
        return len(self._events)
