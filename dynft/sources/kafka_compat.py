"""Fixes for two kafka-python 3.0 join bugs that leave a member without its partitions.

Both concern a join that outlasts one ``consumer.poll(timeout_ms=...)``: the poll gives up,
and the JoinGroup/SyncGroup round trip finishes in the background (kafka-python 3.0.12, the
eager protocol).

1. **The flag.** A rebalance that starts because the leader's metadata changed (a topic's
   partitions appeared or changed) is reported by ``ConsumerCoordinator.need_rejoin`` from
   the metadata snapshot, but the ``rejoin_needed`` flag stays false. The background join
   runs the assignment, which updates the snapshot, so at the next poll ``need_rejoin`` is
   false and the loop that would hand the answer to ``_on_join_complete`` never runs. The
   member keeps its revoked partitions as "pending revocation" for as long as it lives:
   ``assignment()`` lists them, but nothing fetches them and no rebalance listener runs.
   The same holds for a subscription change, which ``need_rejoin`` also reads from a
   snapshot. The Java client closed this gap in KAFKA-9815: a rebalance the snapshot asks
   for also sets the flag. Here ``need_rejoin`` is wrapped so that a true answer sets it.

2. **The finished join.** With the flag held, the next poll does enter the join loop, but
   the loop starts a new JoinGroup whenever the cached join is done, even when it is done
   because it succeeded. The assignment is thrown away and the whole group rebalances
   again, which needs every member to rejoin, and is again likely to finish between two
   polls. The Java client hands a finished join future to ``onJoinComplete`` and only then
   drops it; ``join_group_async`` is wrapped to do the same.

``tests/sources/test_kafka_rebalance.py`` produces each bug on demand with the real broker.
Before these fixes they were the cause of the flaky two-daemon and slow-step tests in
``tests/test_kafka_daemon.py``. Both fixes are applied only on kafka-python 3.0.x.
"""

from __future__ import annotations

import logging
from typing import Any

import kafka
from kafka.coordinator.base import BaseCoordinator, MemberState
from kafka.coordinator.consumer import ConsumerCoordinator

log = logging.getLogger(__name__)
_MARK = "_dynft_fixed"


def apply_join_fixes() -> bool:
    """Patch the join loop once (both fixes); returns whether the patches are in place."""
    if getattr(ConsumerCoordinator.need_rejoin, _MARK, False):
        return True
    # tests/sources/test_kafka_rebalance.py shows whether another version needs a fix.
    if not fits_version("the 3.0 rebalance fixes"):
        return False
    _hold_rejoin_flag()
    _consume_finished_join()
    return True


def fits_version(fixes: str) -> bool:
    """Whether this kafka-python is of the 3.0 line the patches of ``fixes`` were written for.

    They wrap private parts of it, which another line may have changed: leave those as they are.
    """
    if kafka.__version__.startswith("3.0."):
        return True
    log.warning("kafka-python %s: %s are not applied", kafka.__version__, fixes)
    return False


def _hold_rejoin_flag() -> None:
    original = ConsumerCoordinator.need_rejoin

    def need_rejoin(self: Any) -> bool:
        needed = bool(original(self))
        if needed and not self.rejoin_needed:
            self.request_rejoin()  # held until a join completes, not until the snapshots agree
        return needed

    setattr(need_rejoin, _MARK, True)
    need_rejoin.__doc__ = original.__doc__
    ConsumerCoordinator.need_rejoin = need_rejoin  # type: ignore[method-assign]


def _consume_finished_join() -> None:
    original = BaseCoordinator.join_group_async

    async def join_group_async(self: Any, timeout_ms: Any = None) -> bool:
        task = self._join_task
        # A join that succeeded in the background, for a generation nothing has reset since
        # (a reset leaves REBALANCING): apply it as the loop does when it waits the join out.
        finished = task is not None and task.succeeded()
        if finished and self.state is MemberState.REBALANCING and not self._generation.is_lost():
            self._join_task = None
            with self._lock:
                self.rejoining = False
                self.rejoin_needed = False
                self.state = MemberState.STABLE
                self._enable_heartbeat()
            generation = self._generation
            await self._on_join_complete_async(
                generation.generation_id, generation.member_id, generation.protocol, task.value
            )
            return True
        return bool(await original(self, timeout_ms))

    join_group_async.__doc__ = original.__doc__
    BaseCoordinator.join_group_async = join_group_async  # type: ignore[method-assign]
