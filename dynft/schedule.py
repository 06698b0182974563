"""When a version is due: one publisher's schedule (``dynft.publisher`` cuts and judges the version).

Every ``registry.publish_every_steps`` steps or ``registry.publish_interval_s`` seconds, whichever
comes first, and only if the trainer moved. Sooner for freshness: right after a step that trained
fresh events (``registry.publish_fresh``), while nothing serves after
``registry.first_publish_steps`` steps (cold start), and at the first step after a label is seen
for the first time (``registry.publish_on_new_label``). While training work waits, fresh
publishing keeps to ``registry.publish_budget`` of the trainer's time.

A publish that failed (a full disk, a registry write refused) is due again after 1, 2, 4 ... 60 s
whether or not anything was trained since: the last steps of a stream that went quiet still
become a version, instead of waiting for an event that may not come. The training thread owns it.

>>> from dynft.settings import load_settings
>>> schedule = Schedule(load_settings().registry)
>>> schedule.due(steps=0, labels=2, serving=False, waiting=lambda: False)  # nothing trained
False
>>> schedule.trained(16); schedule.due(steps=1, labels=2, serving=False, waiting=lambda: False)
True
>>> schedule.mark(steps=1); schedule.failed(now=100.0)
>>> [schedule.due(1, 2, True, lambda: False, now=t) for t in (100.5, 101.0)]  # tried again, nothing trained since
[False, True]
>>> schedule.failed(now=100.0); schedule.due(1, 0, True, lambda: False, now=200.0)  # no head row: nothing to serve
False
>>> schedule.mark(steps=1); schedule.succeeded(); schedule.due(1, 2, True, lambda: False)
False
"""

from __future__ import annotations

import time
from collections.abc import Callable

from dynft.backoff import Backoff
from dynft.settings import RegistrySettings

RETRY_FIRST_S, RETRY_MAX_S = 1.0, 60.0


class Schedule:
    def __init__(self, settings: RegistrySettings) -> None:
        self.settings = settings
        self.at_step = 0  # the steps (the publisher's clock) when the last publish began
        self.at = time.monotonic()
        self.cost = 0.0  # seconds the last publish took (registry.publish_budget)
        self.fresh = 0  # fresh events trained since the last publish
        self.labels = -1  # labels the last published version knew (-1: not yet known)
        self.retry = Backoff(RETRY_FIRST_S, RETRY_MAX_S)  # while publishes fail

    def due(
        self,
        steps: int,
        labels: int,
        serving: bool,
        waiting: Callable[[], bool],
        force: bool = False,
        now: float | None = None,
    ) -> bool:
        """Whether a version is due at ``steps`` with ``labels`` known (``force``: whenever the
        trainer moved since the last one); ``serving``: a version serves; ``waiting``: whether
        training work waits (publishing now would delay it)."""
        now = time.monotonic() if now is None else now
        if not labels:  # no head row yet: nothing to serve
            return False
        if self.retry.failures:
            return force or self.retry.due(now)
        if steps == self.at_step:
            return False
        if self.labels < 0:  # first call since the start: what was restored is not new
            self.labels = labels
        r = self.settings
        moved = steps - self.at_step
        due = moved >= r.publish_every_steps or now - self.at >= r.publish_interval_s
        due = due or (not serving and moved >= r.first_publish_steps)  # cold start
        due = due or (r.publish_on_new_label and labels > self.labels)
        return due or force or self._fresh_due(waiting, now)

    def _fresh_due(self, waiting: Callable[[], bool], now: float) -> bool:
        """Fresh events were trained since the last publish, and publishing now keeps to the budget."""
        r = self.settings
        if not r.publish_fresh or not self.fresh:
            return False
        if not waiting():  # the trainer would wait for events anyway
            return True
        since = now - self.at - self.cost
        return since >= self.cost * (1 - r.publish_budget) / r.publish_budget

    def trained(self, fresh: int) -> None:
        self.fresh += fresh

    def mark(self, steps: int) -> None:
        """A publish begins at ``steps``: the next interval starts now."""
        self.at_step, self.at = steps, time.monotonic()
        self.fresh = 0

    def published(self, labels: int) -> None:
        """A version with ``labels`` labels was written."""
        self.labels = labels

    def succeeded(self) -> None:
        """The publish begun at the last ``mark`` finished (written, judged, promoted, sent): no retry."""
        self.retry.reset()

    def failed(self, now: float | None = None) -> None:
        """The publish begun at the last ``mark`` did not finish: due again after the backoff."""
        self.retry.failed(now)
