"""Each named task's fresh events, held until they fill the task's fresh share of a step.

A daemon of one task trains ``batch_size - replay`` fresh events a step (fewer only when fewer
are queued). A take from the intake of a stream of several tasks holds only a few events of
each; a task trained on its few at once fills the rest of its batch with replay, and with four
tasks that made about twice a daemon's rows, and its CPU, per event
(``benchmarks.quality.multitask``). So a task's fresh events wait here until they fill its share
(one step each, as a daemon's would), until nothing more is queued in the intake that could fill
it (the trainer would idle: no CPU to save), until the oldest has waited ``tasks.fill_wait_s``
(a rare task's events are not kept from training for long by busy ones), or until the batching
thread stops. The bound is not ``trainer.fresh_wait_s``: while other tasks train, a frequent
task's share takes a few steps to fill, and half a second made a third of its steps partial.

A record whose event waits here holds back every record taken after it (``released``): positions
are committed only up to records whose events have an outcome, so a crash loses no waiting event
(at-least-once). Owned by the batching thread.

>>> from dynft.sources import Record
>>> wait, r = FreshWait(wait_s=0.5, clock=lambda: 0.0), [Record(b"", "s", n) for n in (1, 2, 3)]
>>> wait.taken(r)
>>> wait.hold("a", [(r[0], "e0"), (r[2], "e2")], arrived=0.0)
>>> [rec.next for rec in wait.released()], wait.due(lambda task: 3, flush=False, behind=False)
([], [])
>>> [(task, [e for _, e in pairs]) for task, pairs, _ in wait.due(lambda task: 2, flush=False, behind=False)]
[('a', ['e0', 'e2'])]
>>> [rec.next for rec in wait.released()], len(wait)
([1, 2, 3], 0)
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from dynft.sources import Record

E = TypeVar("E")


class FreshWait(Generic[E]):
    """Fresh ``(record, event)`` pairs per task, with the time each was taken from the intake."""

    def __init__(self, wait_s: float, clock: Callable[[], float] = time.time) -> None:
        self.wait_s = wait_s
        self._clock = clock
        self._tasks: dict[str, list[tuple[Record, E, float]]] = {}
        self._taken: deque[Record] = deque()  # every record taken and not yet released, in order
        self._waiting: set[int] = set()  # id() of the records whose events wait (each is in _taken)

    def __len__(self) -> int:
        return len(self._waiting)

    def taken(self, records: list[Record]) -> None:
        """Every record taken from the intake, in order (whether its event waits or not)."""
        self._taken.extend(records)

    def hold(self, task: str, pairs: list[tuple[Record, E]], arrived: float) -> None:
        self._tasks.setdefault(task, []).extend((record, event, arrived) for record, event in pairs)
        self._waiting.update(id(record) for record, _ in pairs)

    def patience(self) -> float:
        """How long a take may wait for records before the oldest waiting event is due anyway."""
        if not self._waiting:
            return self.wait_s
        oldest = min(pairs[0][2] for pairs in self._tasks.values() if pairs)
        return max(0.0, min(self.wait_s, oldest + self.wait_s - self._clock()))

    def due(
        self, share: Callable[[str], int], flush: bool, behind: bool
    ) -> list[tuple[str, list[tuple[Record, E]], float]]:
        """What trains now, oldest first: ``(task, pairs, when the oldest was taken)``.

        Each task's full shares (``share(task)`` events, at least one), one step each; the rest too
        when ``flush`` (nothing more could fill it now) or when its oldest has waited ``wait_s``.
        ``behind`` (the trainer is behind its feed): everything of a task in one piece, of which
        the step trains the newest share and replays the rest.
        """
        out: list[tuple[str, list[tuple[Record, E]], float]] = []
        now = self._clock()
        for task, pairs in self._tasks.items():
            size = len(pairs) if behind else max(1, share(task))
            while pairs and (len(pairs) >= size or flush or now - pairs[0][2] >= self.wait_s):
                piece, pairs[:] = pairs[:size], pairs[size:]
                self._waiting.difference_update(id(record) for record, _, _ in piece)
                out.append((task, [(record, event) for record, event, _ in piece], piece[0][2]))
        return out

    def released(self) -> list[Record]:
        """The records taken before any whose event still waits: their positions may advance."""
        out: list[Record] = []
        while self._taken and id(self._taken[0]) not in self._waiting:
            out.append(self._taken.popleft())
        return out
