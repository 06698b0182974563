"""The training loop's side of many tasks (see ``dynft.tasks``): a mixin of ``TrainingLoop``.

The default task's parts are the loop's own fields (its drift reactions live there); every
other task is a ``Task`` made here on its first work. On the batching thread: a task's steps,
each a whole fresh share of its events (they wait to fill it: ``dynft.freshwait``) with replay
from its own buffer (task-balanced: every task gets its own steps, as a daemon of its own would);
the buffers share ``buffer.max_events`` max-min fairly. Each task reacts to its own drift
(``Task.reaction``). On the main thread: its step, hold-out, versions, metrics and checkpoint part.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import TYPE_CHECKING, Any

from dynft.batching import Collator
from dynft.buffer import ReplayBuffer, fair_shares
from dynft.checkpoint import Checkpoint
from dynft.errors import AdapterMismatchError
from dynft.evaluation import HoldoutWindow
from dynft.events import Event
from dynft.freshwait import FreshWait
from dynft.metrics import TrainerMetrics
from dynft.publisher import Publisher
from dynft.reaction import DriftReaction
from dynft.replication.feed import VersionsFeed
from dynft.routing import Router
from dynft.settings import Settings
from dynft.sharing import Member, publish_together
from dynft.sources import Record
from dynft.tasks import DEFAULT_TASK, Task, TaskDirectory, TaskWork, task_collator, task_name_problem
from dynft.term import TermView
from dynft.trainer import OnlineTrainer
from dynft.warmup import read_before_committed, refill

if TYPE_CHECKING:
    from dynft.loop import Work

log = logging.getLogger(__name__)


def split_by_task(pairs: list[tuple[Record, Event]]) -> dict[str, list[tuple[Record, Event]]]:
    """``pairs`` grouped by their event's task, in order."""
    out: dict[str, list[tuple[Record, Event]]] = {}
    for record, event in pairs:
        out.setdefault(event.task_name, []).append((record, event))
    return out


class TaskLoop:
    """The loop's methods for tasks other than ``default``; ``TrainingLoop`` provides the fields below."""

    settings: Settings
    trainer: OnlineTrainer
    publisher: Publisher  # the default task's (its feed carries every task's versions)
    buffer: ReplayBuffer  # the default task's
    holdout: HoldoutWindow  # the default task's
    metrics: TrainerMetrics
    tasks: dict[str, Task]  # main thread
    task_directory: TaskDirectory | None
    _task_parts_made: dict[str, tuple[Collator, ReplayBuffer]]  # under _parts_lock (both threads)
    _parts_lock: threading.Lock
    _fresh_wait: FreshWait[Event]  # batching thread only
    reaction: DriftReaction  # the default task's

    def _router(self) -> Router:
        raise NotImplementedError

    def work_waiting(self) -> bool:
        raise NotImplementedError

    def _publish_meta(self) -> dict[str, Any]:
        raise NotImplementedError

    def _add_waited(self, work: Work, flush: bool, behind: bool) -> None:
        """The other tasks' steps whose fresh events are due (``dynft.freshwait``) join ``work``,
        which then carries the records whose positions may advance."""
        for name, fresh, arrived in self._fresh_wait.due(self._fresh_share, flush, behind):
            share, dead = self._task_work(name, fresh, [])
            share.arrived = arrived
            work.tasks.append(share)
            work.dead += dead
        work.records = self._fresh_wait.released()

    def _fresh_share(self, name: str) -> int:
        """How many fresh events task ``name``'s step trains: a batch less the replay its buffer allows."""
        size, ratio = self.settings.trainer.batch_size, self.settings.buffer.replay_ratio
        return size - min(round(size * ratio), size - 1, len(self._task_parts(name)[1]))

    def _task_work(
        self, name: str, fresh: list[tuple[Record, Event]], held: list[tuple[Record, Event]]
    ) -> tuple[TaskWork, list[str]]:
        """Another task's step: its fresh events with replay from its own buffer (task-balanced)."""
        router, (collator, buffer) = self._router(), self._task_parts(name)
        held_out, dead = router.screen(collator, held)
        share = self._fresh_share(name)
        surplus = [event for _, event in fresh[:-share]]  # more than a share: the newest train, the rest replay
        fresh, batch = fresh[-share:], None
        size = self.settings.trainer.batch_size
        # The task's reaction, once the main thread made it: its lineage and plan are read whole
        # (as the default task's are), and replay of an older lineage is drawn again (Task.redraw).
        task = self.tasks.get(name)
        lineage, plan = (task.reaction.lineage, task.reaction.replay_plan()) if task else (1, (None, 0.0))
        if fresh:
            batch, failed = router.collate(collator, fresh, buffer.sample(size - len(fresh), *plan))
            dead += failed
        return TaskWork(name, batch, held_out, surplus, lineage), [key for _, key in dead]

    def _task_parts(self, name: str) -> tuple[Collator, ReplayBuffer]:
        """Task ``name``'s collator and replay buffer, made on first use by either thread."""
        with self._parts_lock:
            parts = self._task_parts_made.get(name)
            if parts is None:
                labels = self._directory().admit(name)
                if labels is None:
                    raise RuntimeError(f"task {name!r} was not admitted")
                b = self.settings.buffer
                buffer = ReplayBuffer(
                    b.max_events, b.max_bytes, b.strategy, b.recency_half_life, self.settings.trainer.seed
                )
                parts = self._task_parts_made[name] = (task_collator(self.trainer.collator, labels), buffer)
                self._share_buffers()
            return parts

    def _replayable(self) -> int:
        """Events the replay of a take can draw on: the default task's buffer, or a lone other task's.

        A take leaves ``buffer.replay_ratio`` of a batch for replay only while there is something
        to replay. A stream of one named task (a sharded trainer's, say) replays as a default one;
        with several named tasks a take stays a whole batch, whose events wait to fill each
        task's own share (``_add_waited``).
        """
        with self._parts_lock:
            others = [buffer for _, buffer in self._task_parts_made.values()]
        return len(others[0]) if len(others) == 1 and not len(self.buffer) else len(self.buffer)

    def _share_buffers(self) -> None:
        """The tasks' replay buffers share ``buffer.max_events`` and ``max_bytes`` fairly (``fair_shares``):
        a task that has offered fewer events than an even share keeps room for all of them and as
        many more (at most a step's), the others split the rest, so tasks of a few events (or
        throwaway names) do not shrink a large task's replay. Shares are set again after each step
        (each buffer evicts by its own strategy). One task alone (``default``) keeps the whole
        buffer, as before tasks existed. Called with ``_parts_lock`` held."""
        b, buffers = self.settings.buffer, [self.buffer, *(buffer for _, buffer in self._task_parts_made.values())]
        # Room for the next step's events, before the next sharing: a growing task grows its share.
        offered = [max(len(buffer), buffer.seen) for buffer in buffers]
        wants = [n + min(n, self.settings.trainer.batch_size) for n in offered]
        for buffer, share in zip(buffers, fair_shares(wants, b.max_events), strict=True):
            buffer.resize(share, max(1, b.max_bytes * share // b.max_events))

    def _reshare_buffers(self) -> None:
        """After a step of several tasks (main thread): their shares follow what each has offered."""
        with self._parts_lock:
            if self._task_parts_made:
                self._share_buffers()

    def _directory(self) -> TaskDirectory:
        if self.task_directory is None:
            raise RuntimeError("the task directory is used before startup")
        return self.task_directory

    def _task(self, name: str, resume: bool = True) -> Task:
        """Task ``name``, created with a fresh adapter and head the first time (main thread)."""
        task = self.tasks.get(name)
        if task is None:
            collator, buffer = self._task_parts(name)
            trainer = self.trainer.fork(collator, share_adapter=self.shared)
            feed = self.publisher.feed if isinstance(self.publisher.feed, VersionsFeed) else None
            task = self.tasks[name] = Task(
                name, trainer, buffer, self.settings, home=self.trainer, metrics=self.metrics, feed=feed
            )
            task.publisher.waiting = self.work_waiting
            self.metrics.task_publish_errors.labels(name)  # at 0 from the start: increase() sees a first failure
            if self.shared:
                task.publisher.clock = self.joint_steps
            self.trainer.activate()
            log.info("task %s: new adapter and head (%d tasks)", name, len(self.tasks) + 1)
            if resume:
                task.resume()
        return task

    @property
    def shared(self) -> bool:
        """Whether every task trains one adapter (``tasks.sharing = shared``, see ``dynft.sharing``)."""
        return self.settings.tasks.sharing == "shared"

    def joint_steps(self) -> int:
        """Steps of every task: in shared mode, what moved the adapter every task publishes."""
        return self.trainer.steps + sum(task.trainer.steps for task in self.tasks.values())

    def _publish_all(self, force: bool = False) -> None:
        """Every task's version when due: each on its own schedule, or (shared) all together."""
        if not self.shared:
            self.publisher.maybe_publish(self._publish_meta(), force=force)
            for task in list(self.tasks.values()):
                self._publish_task(task, force)
            return
        members = [Member(DEFAULT_TASK, self.publisher, contextlib.nullcontext, self._publish_meta)]
        members += [Member(t.name, t.publisher, t.installed, t.publish_meta) for t in self.tasks.values()]
        published = publish_together(members, self.settings.gate, self.joint_steps(), force)
        for task in self.tasks.values():
            if task.name in published:
                self._task_versions_metrics(task)

    def _publish_task(self, task: Task, force: bool = False) -> None:
        if task.maybe_publish(force) is not None:
            self._task_versions_metrics(task)

    def _task_versions_metrics(self, task: Task) -> None:
        self.metrics.task_latest_version.labels(task.name).set(task.publisher.latest_version or 0)
        self.metrics.task_serving_version.labels(task.name).set(task.publisher.serving_version or 0)

    def _complete_task(self, share: TaskWork, arrived: float) -> list[tuple[str, str]]:
        """Train another task on its share; returns the ledger outcomes of its events."""
        task = self._task(share.task)
        arrived = share.arrived or arrived
        outcomes: list[tuple[str, str]] = []
        if share.batch is not None:
            fresh = share.batch.events[: share.batch.n_fresh]
            detections = task.drift.detections
            trained = task.train(task.redraw(share.batch, share.lineage))
            for reaction in task.applied:
                self.metrics.reactions.labels(reaction).inc()
            task.applied.clear()
            status = "trained" if trained else "skipped"
            if trained:
                task.publisher.trained(arrived, fresh, [prediction for _, prediction, _ in trained])
                m = self.metrics
                m.task_events.labels(task.name).inc(len(fresh))
                m.task_accuracy.labels(task.name).set(task.prequential.accuracy)
                m.task_drift.labels(task.name).inc(task.drift.detections - detections)
            outcomes += [(e.id, status) for e in fresh]
            self.metrics.events.labels(status).inc(len(fresh))
        if share.buffered:
            task.buffer.add_many(share.buffered)
            outcomes += [(e.id, "buffered") for e in share.buffered]
            self.metrics.events.labels("buffered").inc(len(share.buffered))
        for event in share.held_out:
            task.holdout.add(event)
        outcomes += [(e.id, "held_out") for e in share.held_out]
        self.metrics.events.labels("held_out").inc(len(share.held_out))
        return outcomes

    def _rewarm(self, term: TermView) -> None:
        """A takeover's warm-up (``dynft.warmup``): every task of the term's partitions gets its replay
        buffer and held-out window back from the events before the committed offsets."""
        sharded = term.election.sharded
        by_task: dict[str, list[Event]] = {}
        for event in read_before_committed(self.settings, term.partitions if sharded else None):
            if not sharded or term.owns(event.task_name):  # a task keyed elsewhere is another trainer's
                by_task.setdefault(event.task_name, []).append(event)
        fraction = self.settings.evaluation.holdout_fraction
        for name, mine in by_task.items():
            if name == DEFAULT_TASK:
                refill(mine, fraction, self.buffer, self.holdout, self.trainer.label_map)
            elif task_name_problem(name) is None and self._directory().admit(name) is not None:
                task = self._task(name)
                refill(mine, fraction, task.buffer, task.holdout, task.collator.label_map)

    def _restore_tasks(self, checkpoint: Checkpoint) -> None:
        """The other tasks' parts of ``checkpoint``; one that no longer fits starts afresh from its
        registry. Every task of the checkpoint is kept, also beyond a ``tasks.max_tasks`` lowered
        since: the cap refuses new tasks, it does not discard trained ones."""
        parts = checkpoint.state.get("tasks", {})
        directory = self._directory()
        if len(parts) + 1 > directory.max_tasks:  # the default task is always there
            log.warning(
                "the checkpoint holds %d tasks, the default task included, above tasks.max_tasks=%d: all are "
                "kept and trained, and no new task is admitted until the setting is raised",
                len(parts) + 1,
                directory.max_tasks,
            )
        for name, part in parts.items():
            if task_name_problem(name) is not None:  # a checkpoint of another version's rules, or damaged
                log.warning("checkpoint task %r is not a valid task name; skipped", name)
                continue
            directory.readmit(name)
            task = self._task(name, resume=False)
            try:
                task.restore(checkpoint.tensors, part, checkpoint.records)
            except AdapterMismatchError as exc:
                log.warning("task %s: checkpoint does not fit (%s); resuming from its registry", name, exc)
                task.resume()
