"""What the training loop keeps across restarts and reports: checkpoints and the status line.

A mixin of ``TrainingLoop`` (``dynft.loop``), which owns the fields declared below; everything
here runs on the main thread. ``_maybe_checkpoint`` writes a checkpoint when one is due (every
task's steps count) and then lets the source commit the positions it covers; ``_capture`` and
``_restore`` are the checkpoint's two directions, every task included; ``_maybe_status``
prints the compact status line and records the console's curves.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from typing import TYPE_CHECKING, cast

from dynft.buffer import ReplayBuffer
from dynft.checkpoint import Checkpoint, CheckpointError, CheckpointStore
from dynft.deadletter import DeadLetterSink
from dynft.drift import DriftMonitor
from dynft.election import Election
from dynft.errors import AdapterMismatchError, DeadLetterError
from dynft.evaluation import HoldoutWindow, Prequential
from dynft.events import DEFAULT_TASK, Event
from dynft.ledger import Ledger
from dynft.publisher import Publisher
from dynft.reaction import DriftReaction
from dynft.recorder import HistoryRecorder
from dynft.registry import AdapterRegistry
from dynft.replication.feed import VersionsFeed
from dynft.sources import Intake, Positions, Source
from dynft.statedisk import StateDisk, free_bytes, is_disk_full
from dynft.taskloop import TaskLoop
from dynft.term import TermView, outdated

if TYPE_CHECKING:
    from dynft.loop import TrainingLoop

log = logging.getLogger("dynft.loop")  # the loop's own logger: these lines are the loop's
STATUS_TASKS = 10  # named tasks on a status line (the busiest; /v1/tasks and the console list all)


class LoopState(TaskLoop):
    """Checkpoints and status of the loop; ``TrainingLoop`` provides the fields below."""

    prequential: Prequential
    holdout: HoldoutWindow
    buffer: ReplayBuffer
    drift: DriftMonitor
    reaction: DriftReaction
    checkpoints: CheckpointStore
    ledger: Ledger
    disk: StateDisk
    sink: DeadLetterSink | None
    history: HistoryRecorder
    positions: Positions
    election: Election | None  # kafka.election: commits wait until versions on the topic cover them
    term: TermView | None  # the term held (one life, when sharded): commits stop when it ends
    _owns_election: bool  # made by the loop (else dynft.lives's, which outlives it)
    should_exit: threading.Event
    _covered: Positions
    _pending_from: dict[str, Positions]  # task -> positions before its oldest step not yet on the topic
    _uncommitted: bool
    _checkpoint_at: tuple[int, float]
    _status_at: float
    _status_events: int

    def _intake(self) -> Intake:
        raise NotImplementedError

    def _maybe_checkpoint(self, force: bool = False) -> None:
        """Write a checkpoint when one is due, then commit the positions it covers.

        The ledger is made durable first: a crash between the two then shows as a duplicate
        delivery (the source re-reads what the older checkpoint lacks), never as an event the
        checkpoint holds but the ledger forgot.
        """
        if not self._uncommitted:
            return
        step, at = self._checkpoint_at
        c = self.settings.checkpoint
        due = self.joint_steps() - step >= c.every_steps or time.monotonic() - at >= c.interval_s  # every task's
        due = due or self.ledger.pending >= self.settings.ledger.max_pending_rows  # intake waits on it
        if self.disk.refusing:  # intake waits on this retry: the backoff's schedule, not the checkpoint's
            due = self.disk.due()
        if not (due or force):
            return
        self._checkpoint_at = (self.joint_steps(), time.monotonic())
        try:
            if self.sink is not None:
                self.sink.flush()  # dead letters are durable before their positions are committed
            self.ledger.commit()
            self.checkpoints.save(self._capture())
        except (CheckpointError, OSError, sqlite3.Error, DeadLetterError) as exc:  # disk full, DLQ down: keep going
            self.metrics.checkpoint_errors.inc()
            what = f"ledger {self.ledger.path}: {exc}" if isinstance(exc, sqlite3.Error) else exc
            if is_disk_full(exc) or self.disk.refusing:  # intake is held: retry with backoff
                log.error("checkpoint failed: %s; intake paused, next try in %.0f s", what, self.disk.refused())
                return
            log.error(
                "checkpoint failed: %s; training goes on, offsets stay uncommitted, next try in %d steps or %.0f s",
                what,
                c.every_steps,
                c.interval_s,
            )
            return
        if self.disk.accepted():
            log.info("the state disk takes writes again")
        self._intake().source.commit(self._committable())
        self._uncommitted = False
        self.metrics.checkpoints.inc()

    # -- elected trainers (kafka.election) --------------------------------------------------

    def _hold_term(self) -> bool:
        """Wait for the election's term, when there is one; False for a standby told to stop."""
        if self.election is None:
            return True
        if self._owns_election:
            self.election.start()
        self.term = self.election.wait(self.should_exit)
        if self.term is None:
            return False
        self.metrics.term_partitions.set(len(self.term.partitions))
        self.metrics.term_epoch.set(self.term.epoch)
        return True

    def _resume(self, source: Source, registry: AdapterRegistry) -> None:
        """Continue from the newest checkpoint, or else from the newest published versions (and,
        for an elected trainer, the events before the committed offsets: ``_rewarm``)."""
        checkpoint = self.checkpoints.latest(check=restorable)
        # Another trainer published since (or, sharded, may have: a life's tasks change with its
        # partitions): take over from the newest versions, as on a new host.
        if checkpoint is not None and self.election is not None:
            stale = self.settings.kafka.sharded or outdated(checkpoint.state, registry)
            checkpoint = None if stale else checkpoint
        if checkpoint is not None:
            self._restore(checkpoint)
            source.resume_from(self.positions)
            return
        if self.election is None and self.checkpoints.has_any():  # all damaged: say what that costs, once
            log.warning(
                "no checkpoint in %s can be restored (see above): the stream's positions, replay buffer and "
                "held-out window start afresh; a file source is read again from its start, a Kafka group from its "
                "committed offsets (at-least-once: events are trained again)",
                self.checkpoints.root,
            )
        self.publisher.resume()
        if self.term is not None:  # a takeover on another host: no checkpoint, the stream has the past
            self._rewarm(self.term)

    def _close_replication(self) -> None:
        """The versions feed (its thread and clients go with this loop: a sharded life ends) and an
        election of the loop's own (leaving its group: a standby takes over at once)."""
        feed = self.publisher.feed if hasattr(self, "publisher") else None
        if isinstance(feed, VersionsFeed):
            feed.close()
        if self.election is not None and self._owns_election:
            self.election.close()

    def _resync_feeds(self) -> None:
        """A task whose last versions-topic sync failed syncs again once its retry is due: one task
        a tick, since during a broker outage each try may wait out the send timeout."""
        for publisher in self._publishers().values():
            if publisher.resync():
                return

    def _note_pending(self, before: Positions) -> None:
        """Election, after a work: each task whose steps are not all on the topic now waits from
        ``before`` (the positions before the work) on, unless it waited already."""
        if self.election is not None:
            for name, publisher in self._publishers().items():
                if not publisher.on_topic:
                    self._pending_from.setdefault(name, before)

    def _note_covered(self) -> None:
        """Election: a position is committable once every event before it that a task trained is in a
        version of that task on the versions topic. Each task holds the commits back to where its
        oldest step not yet on the topic began, and no further; the other tasks' do not wait for it."""
        if self.election is None:
            return
        publishers = self._publishers()
        for name in [n for n in self._pending_from if n not in publishers or publishers[n].on_topic]:
            del self._pending_from[name]
        covered = dict(self.positions)
        for since in self._pending_from.values():  # a stream the task's wait began before knowing: not yet
            covered = {stream: min(at, since[stream]) for stream, at in covered.items() if stream in since}
        if covered != self._covered:
            self._covered = covered
            self._uncommitted = True  # the next checkpoint commits them, even if nothing new was processed

    def _publishers(self) -> dict[str, Publisher]:
        return {DEFAULT_TASK: self.publisher, **{name: task.publisher for name, task in self.tasks.items()}}

    def _committable(self) -> Positions:
        """What a checkpoint commits: every processed position, or (election) the covered ones; none after a loss."""
        if self.term is None:
            return dict(self.positions)
        return dict(self._covered) if self.term.current() else {}  # a suspension: the source waits (may_commit)

    def _capture(self) -> Checkpoint:
        tensors, trainer_state = self.trainer.snapshot()
        buffered, buffer_state = self.buffer.snapshot()
        state = {
            "trainer": trainer_state,
            "buffer": buffer_state,
            "prequential": self.prequential.snapshot(),
            "drift": self.drift.snapshot(),
            "publisher": self.publisher.snapshot(),
            "positions": self.positions,
            "reaction": self.reaction.snapshot(),
        }
        holdout = [e.to_builtins() for e in self.holdout.snapshot()]
        records = {"buffer.jsonl": buffered, "holdout.jsonl": holdout}
        if self.tasks:
            state["tasks"] = {}
            for name, task in self.tasks.items():
                task_tensors, state["tasks"][name], task_records = task.snapshot()
                tensors = {**tensors, **task_tensors}
                records.update(task_records)
        return Checkpoint(tensors, state, records)

    def _restore(self, checkpoint: Checkpoint) -> None:
        """Continue from ``checkpoint``; if its trainer part no longer fits, keep the rest and start a new lineage.

        A checkpoint written with another adapter configuration or base model is reported in one
        warning line naming what changed, instead of failing every restart. Kept then: the label
        map, the buffer and the held-out window (plain events), the prequential metrics and the
        positions: the events before them were learned by the old lineage and are replayed from
        the buffer, and re-reading the stream from older positions would train them twice
        (delivery stays at-least-once: nothing after the positions is skipped). The drift state
        and the drift reaction describe the old adapter's errors, so they start afresh.
        """
        state = checkpoint.state
        try:
            self.publisher.check_checkpoint(state["publisher"])
            own = {k: t for k, t in checkpoint.tensors.items() if not k.startswith("task.")}  # the default task's
            self.trainer.restore(own, state["trainer"])
        except AdapterMismatchError as exc:
            log.warning(
                "checkpoint %s does not fit this configuration: %s; starting a new lineage", checkpoint.path, exc
            )
            labels = state["trainer"].get("labels", [])
            self.publisher.start_lineage(
                [label for label in labels if isinstance(label, str)], state["publisher"]["lineage"]
            )
        else:
            self.drift.restore(state["drift"])
            self.publisher.restore(state["publisher"])
            self.reaction.restore(state["reaction"])
        self.buffer.restore(checkpoint.records.get("buffer.jsonl", []), state["buffer"])
        self.holdout.restore([Event.from_builtins(r) for r in checkpoint.records.get("holdout.jsonl", [])])
        self.prequential.restore(state["prequential"])
        self._restore_tasks(checkpoint)
        self.positions = dict(state["positions"])
        self._checkpoint_at = (self.joint_steps(), time.monotonic())
        log.info("resumed from %s: step %d, %d buffered events", checkpoint.path, self.trainer.steps, len(self.buffer))

    # -- status --------------------------------------------------------------------------

    def _maybe_status(self, force: bool = False) -> None:
        """The compact status line: events/s, steps, accuracy, serving version."""
        now = time.monotonic()
        if not force and now - self._status_at < self.settings.run.status_interval_s:
            return
        pq, pub = self.prequential, self.publisher
        rate = (pq.seen - self._status_events) / (now - self._status_at) if self._status_at else 0.0
        self._status_at, self._status_events = now, pq.seen
        self.metrics.disk_free.set(free_bytes(self.settings.state_dir))
        self.history.record(cast("TrainingLoop", self))  # only ever a TrainingLoop's base
        log.info(
            "events %d (%.1f/s) | steps %d | acc %.3f (majority %.3f) | labels %d | buffer %d "
            "| serving %s, latest %s | drift %d",
            pq.seen,
            rate,
            self.trainer.steps,
            pq.accuracy,
            pq.majority_rate,
            len(self.trainer.label_map),
            len(self.buffer),
            _version(self.history.snapshot.task_stats[0].serving),  # made by history.record above
            _version(pub.latest_version),
            self.drift.detections,
        )
        if self.tasks:  # the other tasks, one line: events, accuracy, serving / latest version
            others = self.history.snapshot.task_stats[1:]  # made by history.record above
            # The busiest only: with hundreds of tasks the line ran to 14 KB every few seconds.
            shown = sorted(others, key=lambda t: -t.events)[:STATUS_TASKS]
            more = f" | and {len(others) - len(shown)} more tasks" if len(others) > len(shown) else ""
            log.info(
                "tasks | %s%s",
                " | ".join(
                    f"{t.task} {t.events} ev acc {t.accuracy:.3f} {_version(t.serving)}/{_version(t.latest)}"
                    for t in shown
                ),
                more,
            )
        self._tell_dead_letters()

    def _tell_dead_letters(self) -> None:
        """A warning with the records rejected since the last status line: a stream the daemon
        rejects whole (records without an id, say) otherwise shows only as "events 0"."""
        new = self.history.take_new_dead()  # counted by history.record above
        if not new:
            return
        letters = self.history.snapshot.dead_letters
        newest = f"; the newest: {letters[0].reason} ({letters[0].detail})" if letters else ""
        log.warning(
            "%d record(s) dead-lettered since the last status line (%s), to %s%s",
            new.total(),
            ", ".join(f"{reason} {n}" for reason, n in new.most_common()),
            self.sink.where if self.sink is not None else "the dead-letter sink",
            newest,
        )


def _version(number: int | None) -> str:
    """A version for the status line: ``v3``, or ``none`` before the first."""
    return "none" if number is None else f"v{number}"


STATE_PARTS = ("trainer", "buffer", "prequential", "drift", "publisher", "positions", "reaction")


def restorable(checkpoint: Checkpoint) -> str | None:
    """What makes ``checkpoint`` unrestorable, checked before anything is restored from it (a
    review's ``{}`` in state.json was a KeyError at every restart, for ever), or None. The
    parts' own restores check their contents further."""
    state = checkpoint.state
    missing = [part for part in STATE_PARTS if not isinstance(state.get(part), dict)]
    if missing:
        return f"state.json lacks {', '.join(missing)}"
    if not isinstance(state.get("tasks", {}), dict) or not all(
        isinstance(t, dict) for t in state.get("tasks", {}).values()
    ):
        return "state.json's tasks are not objects"
    for name, rows in checkpoint.records.items():
        if not all(isinstance(row, dict) for row in rows):
            return f"{name} holds a line that is no JSON object"
        if name.endswith("buffer.jsonl") and not all(
            "seq" in row and isinstance(row.get("event"), dict) for row in rows
        ):
            return f"{name} holds a line that is no buffered event"
    return None
