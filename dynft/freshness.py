"""Freshness: how long after an event arrived a version trained on it serves.

The trainer records when the events of each step arrived (``Arrivals``, on the training
thread only); a published version carries, in its metadata, the arrivals of every event
trained since the last *promoted* version (a rejected candidate's events are served only by a
later promotion, so they carry over). The server observes ``served_at - arrived`` for each of
them when it flips to the version (``served_after``).

Arrival times are wall-clock seconds (``time.time()``): trainer and server may be different
processes. To keep the metadata small, at most ``limit`` (time, count) pairs are kept; beyond
that, neighbouring pairs are merged (count-weighted mean time), which moves no event by more
than the span of the pairs merged.

>>> a = Arrivals(limit=4)
>>> for t in (10.0, 11.0, 12.0, 13.0, 14.0):
...     a.add(t, 2)
>>> a.count, a.pairs()
(10, [[10.5, 4], [12.5, 4], [14.0, 2]])
>>> sorted(served_after(a.pairs(), served_at=16.0, since=11.0))
[2.0, 2.0, 3.5, 3.5, 3.5, 3.5]
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any


class Arrivals:
    """When the events trained since the last promotion arrived, as (time, count) pairs."""

    def __init__(self, limit: int = 64) -> None:
        if limit < 2:
            raise ValueError(f"Arrivals needs a limit of at least 2, got {limit}")
        self.limit = limit
        self._pairs: list[list[float]] = []

    @property
    def count(self) -> int:
        return int(sum(n for _, n in self._pairs))

    def add(self, arrived: float, events: int) -> None:
        if events <= 0:
            return
        self._pairs.append([arrived, float(events)])
        if len(self._pairs) > self.limit:
            self._pairs = [_merge(self._pairs[i : i + 2]) for i in range(0, len(self._pairs), 2)]

    def pairs(self) -> list[list[Any]]:
        """JSON-ready ``[[time, count], ...]``, oldest first."""
        return [[round(t, 3), int(n)] for t, n in self._pairs]

    def clear(self) -> None:
        self._pairs = []


def _merge(pairs: list[list[float]]) -> list[float]:
    total = sum(n for _, n in pairs)
    return [sum(t * n for t, n in pairs) / total, total]


def served_after(pairs: Any, served_at: float, since: float) -> Iterator[float]:
    """One freshness figure per event that arrived at or after ``since`` (the server's start:
    earlier events waited for a server, not for a version). Malformed metadata yields nothing."""
    if not isinstance(pairs, list):
        return
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2):
            continue
        arrived, events = pair
        if not isinstance(arrived, int | float) or not isinstance(events, int):
            continue
        try:
            at = float(arrived)  # an int too large for a float raises
        except OverflowError:
            continue
        if not math.isfinite(at) or at < since:
            continue
        for _ in range(min(events, 100_000)):
            yield max(0.0, served_at - at)
