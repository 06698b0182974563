"""``tasks.sharing = shared``: one adapter for every task, versions published and promoted together.

Every task trains the same LoRA weights (``OnlineTrainer.fork(share_adapter=True)``) and its own
head; a take's tasks each get a step on a task-balanced batch of their own, so the adapter
follows the tasks' joint loss one task batch at a time, as in MT-DNN (Liu et al., 2019). A
*shared version* is one snapshot of the adapter with every head: each task's version line gets
a version holding the shared adapter and its own head (so the registry, the CLI and the server
read it as any version), all published in one go from the same weights and marked with the
same ``shared.snapshot`` (the sum of every task's steps then). It is promoted only if no
task's held-out accuracy drops by more than ``gate.tolerance``: each task's candidate is judged
against that task's serving version as usual, and one task's drop holds every task's back.
Main thread only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dynft.errors import DynftError
from dynft.gate import Decision
from dynft.model import AdapterState
from dynft.publisher import Publisher
from dynft.settings import GateSettings

log = logging.getLogger(__name__)


@dataclass
class Member:
    """One task's part in a shared version: its publisher, how to install its head, its metadata."""

    name: str
    publisher: Publisher
    installed: Callable[[], contextlib.AbstractContextManager[Any]]
    meta: Callable[[], dict[str, Any]]


def loses(decision: Decision, gate: GateSettings) -> bool:
    """Whether the candidate's held-out accuracy is below the serving version's by more than the tolerance."""
    c, s = decision.candidate_accuracy, decision.serving_accuracy
    return c is not None and s is not None and decision.holdout_events >= gate.min_holdout and c < s - gate.tolerance


def held_back(decision: Decision, losers: list[str], own: str) -> Decision:
    """``decision`` unless other tasks lost accuracy: then not promoted, saying which did."""
    others = [name for name in losers if name != own]
    if not decision.promote or not others:
        return decision
    return dataclasses.replace(
        decision, promote=False, reason=f"shared version held back: task(s) {', '.join(others)} lose accuracy"
    )


def publish_together(members: list[Member], gate: GateSettings, snapshot: int, force: bool = False) -> dict[str, int]:
    """Publish one shared version when any member's schedule says one is due; returns each task's version.

    All candidates are exported and judged before anything is written, so a failure publishes
    nothing: a shared version is all of its tasks or none.
    """
    if not any(m.publisher.due(force) for m in members):
        return {}
    for m in members:
        m.publisher.mark_published()
    judged: list[tuple[Member, AdapterState, Decision]] = []
    for m in members:
        if not m.publisher.trainer.exported_labels():
            continue  # a task without a head row yet has nothing to serve
        try:
            with m.installed():
                state, decision = m.publisher.candidate()
        except DynftError as exc:
            log.error("could not publish a shared version (task %s; tried again in a while): %s", m.name, exc)
            for each in members:
                if each.publisher.trainer.exported_labels():
                    each.publisher.publish_failed()
            return {}
        judged.append((m, state, decision))
    losers = [m.name for m, _, decision in judged if loses(decision, gate)]
    shared = {"snapshot": snapshot, "tasks": [m.name for m, _, _ in judged], "losing": losers}
    versions: dict[str, int] = {}
    for m, state, decision in judged:
        try:
            with m.installed():
                versions[m.name] = m.publisher.record(
                    state, held_back(decision, losers, m.name), {**m.meta(), "shared": shared}
                )
        except DynftError as exc:
            m.publisher.publish_failed()
            log.error(
                "could not record task %s's part of shared version %d (tried again in a while): %s",
                m.name,
                snapshot,
                exc,
            )
        else:
            m.publisher.schedule.succeeded()
    if losers:  # the gate at work, as a rejected version of one task is (INFO); dozens a minute at WARNING
        log.info("shared version %d held back: task(s) %s lose accuracy", snapshot, ", ".join(losers))
    return versions
