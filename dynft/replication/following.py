"""A serving replica's registry: its serving decisions go to the pointer topic, not to ``serving.json``.

An admin API's promote / rollback / unpin on a replica is sent to the pointer topic (through the
replica's ``Follower``), and returns once the follower has applied it, so every replica (and the
trainer) follows it; the follower alone writes ``serving.json`` (``dynft.replication.follower``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dynft.events import DEFAULT_TASK
from dynft.fingerprint import BaseModelId
from dynft.pointer import ServingPointer, now, rollback_target
from dynft.registry import AdapterRegistry, check_base_model

if TYPE_CHECKING:
    from dynft.replication.follower import Follower


class FollowingRegistry(AdapterRegistry):
    """A replica's registry (of one task): serving decisions go to the pointer topic, not to ``serving.json``."""

    follower: Follower
    task: str = DEFAULT_TASK

    def promote(
        self,
        version: int,
        reason: str,
        pin: bool = False,
        base_model: BaseModelId | None = None,
        unless_pinned: bool = False,
    ) -> bool:
        self.follower.ensure(version, self.task)
        _, meta = self.load(version)  # refuse a version that is missing or fails its hash check here already
        check_base_model(version, meta, base_model)
        current = self.serving()
        if unless_pinned and current.pinned:
            return False
        pointer = ServingPointer(version, pin, reason, now(), self._history(current, version))
        self.follower.send_pointer(pointer, self.task)
        return True

    def rollback(self, reason: str = "rollback") -> int:
        current = self.serving()
        for entry in current.history:
            self.follower.ensure(entry["version"], self.task)
        target = rollback_target(current, self.versions())
        self.load(target)
        rest = [h for h in current.history if h["version"] != target]
        self.follower.send_pointer(ServingPointer(target, True, reason, now(), rest), self.task)
        return target

    def unpin(self) -> None:
        current = self.serving()
        if current.version is not None and current.pinned:
            current.pinned = False
            current.updated_at = now()
            self.follower.send_pointer(current, self.task)

    @staticmethod
    def _history(current: ServingPointer, version: int) -> list[dict[str, Any]]:
        if current.version is None or current.version == version:
            return current.history
        entry = {"version": current.version, "reason": current.reason, "updated_at": current.updated_at}
        return [entry, *current.history[:49]]
