"""When a trainer counts as behind its feed, and so trains the newest events first.

A trainer slower than a live feed that queues every event falls further behind the longer it
runs, and what users are served ages with it (on the concept stream at 20 events/s, the new
concept reached users about 15 s after the change). Behind, a step takes every queued record,
trains the newest and sends the older ones to the replay buffer (``TrainingLoop._next_work``).

A backlog is not a feed, so three conditions, in order:

1. the trainer has *caught up* with its source once: the source had nothing more to give and
   at most ``trainer.freshest_first_backlog`` records were queued. Before that it reads a
   backlog (a file, a topic from its start, a restart after downtime) and trains every event
   in order; a finite file is trained whole.
2. more than ``freshest_first_backlog`` records wait;
3. and have waited so since ``trainer.freshest_first_after_s``: a burst the trainer drains in
   time is trained whole. Once a trainer was behind that long it is slower than its feed, and
   from then on it trains the newest first whenever the backlog is exceeded.

``freshest_first_backlog = 0`` turns it off. Owned by the batching thread.

>>> now = [0.0]
>>> lag = FeedLag(backlog=16, after_s=5.0, clock=lambda: now[0])
>>> lag.behind(queued=400, dry=False)  # reading a backlog
False
>>> lag.behind(queued=10, dry=True)  # caught up with the source
False
>>> lag.behind(queued=40, dry=False)  # a burst...
False
>>> now[0] = 6.0
>>> lag.behind(queued=60, dry=False)  # ...that lasted: slower than the feed
True
>>> lag.behind(queued=5, dry=True), lag.behind(queued=17, dry=False)
(False, True)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class FeedLag:
    def __init__(self, backlog: int, after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.backlog = backlog
        self.after_s = after_s
        self._clock = clock
        self.live = False  # caught up with the source once (condition 1)
        self.slower = False  # was behind for after_s once (condition 3)
        self._above_since: float | None = None

    def behind(self, queued: int, dry: bool) -> bool:
        """Whether a step now trains the newest of ``queued`` records; ``dry``: the source has
        had nothing more to give since it started (the intake's ``dry``)."""
        if not self.backlog:
            return False
        if not self.live:
            self.live = dry and queued <= self.backlog
            return False
        if queued <= self.backlog:
            self._above_since = None
            return False
        if self.slower:
            return True
        now = self._clock()
        if self._above_since is None:
            self._above_since = now
        if now - self._above_since < self.after_s:
            return False
        self.slower = True
        log.warning(
            "the trainer has been more than %d records behind its feed for %.0f s: from now on it trains the "
            "newest events first and sends older ones to the replay buffer (trainer.freshest_first_backlog)",
            self.backlog,
            now - self._above_since,
        )
        return True
