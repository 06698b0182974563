"""A fix for a kafka-python 3.0 rebalance bug that leaves a group leader without partitions.

The bug (kafka-python 3.0.12, the eager protocol):

1. A rebalance starts because the leader's metadata changed (a topic's partitions appeared
   or changed). ``ConsumerCoordinator.need_rejoin`` reports it from the metadata snapshot,
   but the ``rejoin_needed`` flag stays false.
2. The leader revokes its partitions and sends JoinGroup. ``consumer.poll(timeout_ms=100)``
   gives up before the join ends and leaves the join running in the background.
3. The background join runs the assignment, which updates the snapshot, and gets the
   SyncGroup answer. At the next poll, ``need_rejoin`` is false (snapshot equal, flag false),
   so the loop that would hand the answer to ``_on_join_complete`` never runs.

After that, the member keeps its revoked partitions as "pending revocation": they are still
listed in ``assignment()``, but nothing fetches them and no rebalance listener runs again,
for as long as the process lives. ``tests/sources/test_kafka_rebalance.py`` produces this on
demand with the real broker. Before this fix, it was the cause of the flaky two-daemon and
slow-step tests in ``tests/test_kafka_daemon.py``.

The Java client fixed the same gap in KAFKA-9815: a rebalance that the metadata snapshot
asks for also sets the flag. This module does the same in kafka-python: it wraps
``need_rejoin`` so that a true answer sets ``rejoin_needed``. The join loop then waits for
the background join, and only a finished join clears the flag.
"""

from __future__ import annotations

import logging
from typing import Any

import kafka
from kafka.coordinator.consumer import ConsumerCoordinator

log = logging.getLogger(__name__)
_MARK = "_dynft_sets_rejoin_needed"


def fix_metadata_rejoin() -> bool:
    """Patch ``ConsumerCoordinator.need_rejoin`` once; returns whether the patch is in place."""
    original = ConsumerCoordinator.need_rejoin
    if getattr(original, _MARK, False):
        return True
    if not kafka.__version__.startswith("3.0."):
        # Another line of kafka-python may have changed the join loop: leave it as it is.
        # tests/sources/test_kafka_rebalance.py shows whether that version needs a fix.
        log.warning("kafka-python %s: the 3.0 rebalance fix is not applied", kafka.__version__)
        return False

    def need_rejoin(self: Any) -> bool:
        needed = bool(original(self))
        if needed and not self.rejoin_needed:
            self.request_rejoin()  # held until a join completes, not until the snapshots agree
        return needed

    setattr(need_rejoin, _MARK, True)
    need_rejoin.__doc__ = original.__doc__
    ConsumerCoordinator.need_rejoin = need_rejoin  # type: ignore[method-assign]
    return True
