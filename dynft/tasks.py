"""Many tasks on one base model: a task is one object that owns everything learned for it.

An event's ``task`` (``default`` when absent) selects its label space, head and adapter, replay
share, prequential metrics, drift monitor, hold-out window and version line. A single-task
daemon is the one task ``default``, whose versions live where they always did (``<registry>``);
every other task's live in ``<registry>/tasks/<task>``, so an existing state directory is
read as task ``default`` with no manual step.

Sharing (``per_task``): every task has its own LoRA adapter and head, installed by reference
into the one peft model before the task trains or is scored (``OnlineTrainer.fork``), with its
own optimizer: a task's step touches only its parameters, and an idle task's optimizer state
costs nothing. Threads: ``TaskDirectory`` is shared (behind its lock) by the batching thread,
which admits tasks and their labels, and the main thread, which owns each ``Task``'s trainer
and publisher.

>>> directory = TaskDirectory(LabelMap(capacity=3), max_tasks=2)
>>> directory.admit("default") is not None, directory.admit("intents") is not None, directory.admit("topics")
(True, True, None)
>>> directory.names()
['default', 'intents']
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dynft.batching import Batch, Collator, LabelMap
from dynft.buffer import ReplayBuffer
from dynft.drift import DriftMonitor
from dynft.evaluation import HoldoutWindow, Prequential
from dynft.events import DEFAULT_TASK, Event, task_name_problem
from dynft.metrics import TrainerMetrics
from dynft.publisher import Publisher
from dynft.reaction import DriftReaction, Response
from dynft.registry import AdapterRegistry
from dynft.replication.feed import VersionsFeed
from dynft.settings import Settings
from dynft.trainer import OnlineTrainer

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_TASK", "Task", "TaskDirectory", "TaskWork", "task_name_problem", "task_registry_dir"]


def task_registry_dir(registry_dir: Path, task: str) -> Path:
    """Where ``task``'s versions live: the registry root for ``default`` (as before tasks existed)."""
    return registry_dir if task == DEFAULT_TASK else registry_dir / "tasks" / task


def known_tasks(registry_dir: Path) -> list[str]:
    """The tasks that have a registry under ``registry_dir``, ``default`` first (it always exists).
    A folder without ``versions/`` is none (a stray ``mkdir`` is not a task to list or wait for)."""
    root = registry_dir / "tasks"
    names = sorted(p.name for p in root.iterdir() if (p / "versions").is_dir()) if root.is_dir() else []
    return [DEFAULT_TASK, *(n for n in names if n != DEFAULT_TASK and task_name_problem(n) is None)]


class TaskDirectory:
    """The tasks admitted so far and their label maps, bounded by ``tasks.max_tasks``; thread-safe.

    The batching thread admits a task (and then its labels) before any of its events is trained
    on or held out, so both caps hold whatever happens later.
    """

    def __init__(self, default_labels: LabelMap, max_tasks: int) -> None:
        self.max_tasks = max_tasks
        self.label_capacity = default_labels.capacity
        self._labels: dict[str, LabelMap] = {DEFAULT_TASK: default_labels}
        self._lock = threading.Lock()

    def admit(self, task: str) -> LabelMap | None:
        """``task``'s label map, creating it if the cap allows; ``None``: ``max_tasks`` are known already."""
        labels = self.room(task)
        return None if labels is None else self.enter(task, labels)

    def room(self, task: str) -> LabelMap | None:
        """``task``'s label map, or a new one that is not admitted yet (``enter``) if the cap allows;
        ``None``: ``max_tasks`` are known already. The router admits a task only with an event of
        it that passed every check: a task of refused events takes no place."""
        with self._lock:
            labels = self._labels.get(task)
            if labels is None and len(self._labels) < self.max_tasks:
                labels = LabelMap(capacity=self.label_capacity)
            return labels

    def enter(self, task: str, labels: LabelMap) -> LabelMap | None:
        """Admit ``task`` with ``labels`` (from ``room``) if it is new and the cap still allows;
        returns the task's map (its own where it was known), or ``None``."""
        with self._lock:
            known = self._labels.get(task)
            if known is None and len(self._labels) < self.max_tasks:
                known = self._labels[task] = labels
            return known

    def readmit(self, task: str) -> LabelMap:
        """``task``'s label map for a task of a checkpoint, admitted whatever the cap: it was
        admitted under the cap of its day, and a lower one must not throw its training away."""
        with self._lock:
            known = self._labels.get(task)
            if known is None:
                known = self._labels[task] = LabelMap(capacity=self.label_capacity)
            return known

    def labels(self, task: str) -> LabelMap | None:
        with self._lock:
            return self._labels.get(task)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._labels)

    def __len__(self) -> int:
        with self._lock:
            return len(self._labels)


@dataclass
class TaskWork:
    """One task's share of a take from the intake (made by the batching thread)."""

    task: str
    batch: Batch | None
    held_out: list[Event] = field(default_factory=list)
    buffered: list[Event] = field(default_factory=list)  # beyond one batch: kept for replay, not trained fresh
    lineage: int = 1  # the task's drift-reaction lineage when its replay was drawn (see Task.redraw)
    arrived: float | None = None  # when its oldest fresh event was taken (freshness); None: the take's


class TaskRandom:
    """The torch random generator a task's steps draw from (dropout masks): its own, not the process's.

    With one generator for all tasks, a task's dropout masks depended on how many steps other
    tasks happened to take between its own (thread timing, other traffic), so the same events
    trained it differently from run to run and differently from a daemon of its own. Each task
    with an adapter of its own (``per_task``) seeds its own from ``trainer.seed`` and its name;
    the checkpoint keeps it. Tasks that move one shared adapter depend on each other's steps
    anyway and keep drawing from the process's. On CUDA the device generator (what dropout there
    draws from) is still the process's.
    """

    def __init__(self, seed: int, name: str) -> None:
        generator = torch.Generator()
        generator.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        self.state = generator.get_state()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The task's generator is the process's for the block (the main thread's only user)."""
        saved = torch.get_rng_state()
        torch.set_rng_state(self.state)
        try:
            yield
        finally:
            self.state = torch.get_rng_state()
            torch.set_rng_state(saved)


class Task:
    """What is learned for one task: trainer (adapter + head + optimizer), buffer, metrics, versions.

    Owned by the main thread, except ``buffer`` (thread-safe; the batching thread samples it)
    and ``collator`` (tokenizes on the batching thread; its label map has its own lock).
    """

    def __init__(
        self,
        name: str,
        trainer: OnlineTrainer,
        buffer: ReplayBuffer,
        settings: Settings,
        home: OnlineTrainer,
        metrics: TrainerMetrics,
        feed: VersionsFeed | None = None,
    ) -> None:
        """``home``: the trainer installed whenever no task's method runs (the default task's);
        ``metrics``: the trainer's (the publisher writes only its per-task series for a named task);
        ``feed``: the trainer's versions feed, which this task's versions go to as well."""
        self.name = name
        self.trainer = trainer
        self.home = home
        self.buffer = buffer
        self.prequential = Prequential(settings.evaluation.window)
        self.holdout = HoldoutWindow(settings.evaluation.holdout_window)
        self.drift = DriftMonitor.from_settings(settings.drift, settings.checkpoint.drift_history)
        trainer.capture_features = self.drift.wants_embeddings  # the representation detector's input
        self.settings = settings
        self.reaction = DriftReaction(settings.drift, trainer, buffer)  # replay_plan/lineage: read by the batcher
        self.random = TaskRandom(settings.trainer.seed, name) if trainer.owns_adapter else None
        self.applied: list[str] = []  # reactions applied since the loop last counted them (main thread)
        registry = AdapterRegistry(
            task_registry_dir(settings.registry_dir, name),
            settings.registry.keep_last,
            settings.registry.keep_serving_history,
        )
        removed = registry.clean_staging()
        if removed:
            log.warning("task %s: removed %d half-written version(s) from an earlier crash", name, len(removed))
        # The task's versions go to the trainer's one feed, under the task's keys (never a feed of its own).
        only_local = settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"versions_topic": None})})
        self.metrics = metrics
        lane = feed.lane(name, registry) if feed is not None else None
        self.publisher = Publisher(registry, trainer, self.holdout, only_local, self.metrics, feed=lane, task=name)

    @property
    def collator(self) -> Collator:
        return self.trainer.collator

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """This task's adapter and head in the shared model for the block (a few reference writes
        each way); the default task's are back afterwards, so code that knows one task is unchanged."""
        self.trainer.activate()
        try:
            yield
        finally:
            self.home.activate()

    def own_random(self) -> contextlib.AbstractContextManager[None]:
        """The task's own random generator for the block, where it has one."""
        return self.random.installed() if self.random is not None else contextlib.nullcontext()

    def train(self, batch: Batch) -> list[tuple[Event, str | None, float]]:
        """One step on ``batch`` and this task's drift reactions to it; the fresh events with their
        prequential prediction and loss (none if the step was skipped)."""
        # The reactions act on the installed adapter and head: this task's; so do its dropout masks.
        with self.installed(), self.own_random():
            result = self.trainer.step(batch)
            if result.skipped:
                return []
            fresh = batch.events[: batch.n_fresh]
            self.buffer.add_many(fresh)
            scored = list(zip(fresh, result.predictions, result.losses, strict=True))
            embeddings: list[list[float] | None] = [*result.features] if result.features else [None] * len(scored)
            for (event, prediction, loss), embedding in zip(scored, embeddings, strict=True):
                self.prequential.update(event.label, prediction, loss)
                drift = self.drift.update(prediction != event.label, loss, event.label, embedding, event.text)
                for detection in drift:
                    self._react(self.reaction.on_detection(detection))
                self._react(self.reaction.observe(self.drift.seen - 1, event.label, prediction))
            if self.reaction.boosting:  # extra replay only while no fresh work waits (as the default task's)
                for _ in range(0 if self.publisher.waiting() else self.settings.drift.boost_extra_steps):
                    self._replay_step()
            elif self.reaction.after_step():
                log.info("task %s: drift reaction over after step %d", self.name, self.trainer.steps)
        return scored

    def _replay_step(self) -> None:
        events = self.buffer.sample(self.settings.trainer.batch_size, *self.reaction.replay_plan())
        if events:
            self.trainer.step(self.collator(events, n_fresh=0))

    def _react(self, response: Response) -> None:
        """Note what the reaction did (the loop counts ``applied``); a new lineage begins here too."""
        self.applied += response.applied
        if response.new_lineage:
            self.publisher.new_lineage()
            self.holdout.clear()  # the old concept's held-out events would judge candidates of the new one
        if response.applied:
            log.warning("task %s: reacting to drift with %s", self.name, ", ".join(response.applied))

    def redraw(self, batch: Batch, lineage: int) -> Batch:
        """``batch`` with its replay drawn again if it was drawn before a reset (an older ``lineage``)."""
        if lineage == self.reaction.lineage:
            return batch
        fresh = batch.events[: batch.n_fresh]
        replayed = self.buffer.sample(len(batch.events) - len(fresh), *self.reaction.replay_plan())
        return self.collator(fresh + replayed, n_fresh=len(fresh))

    def publish_meta(self) -> dict[str, Any]:
        pq = self.prequential
        return {
            "task": self.name,
            "events_seen": pq.seen,
            "metrics": {"prequential_accuracy": pq.accuracy, "prequential_macro_f1": pq.macro_f1},
        }

    def maybe_publish(self, force: bool = False) -> int | None:
        with self.installed():
            return self.publisher.maybe_publish(self.publish_meta(), force=force)

    def resume(self) -> None:
        """Continue from this task's newest published version, if any (a start without a checkpoint)."""
        with self.installed():
            self.publisher.resume()

    # -- snapshot / restore (the checkpoint's share of this task) --------------------------

    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, list[dict[str, Any]]]]:
        """Tensors (keys prefixed ``task.<name>.``), plain state and record files of this task."""
        with self.installed(), self.own_random():
            tensors, trainer_state = self.trainer.snapshot()
        if self.random is None:  # the process's generator: the default task's checkpoint part has it
            tensors.pop("rng.torch", None)
        if not self.trainer.owns_adapter:  # tasks.sharing = shared: the default task's part holds the adapter
            heads = {f"param.{k}" for k in self.trainer.slots.head_keys}  # and its moments (OnlineTrainer.fork)
            adapter_moments = tuple(f"optim.{i}." for i in range(len(self.trainer.optimizer.param_groups[0]["params"])))
            tensors = {
                k: t
                for k, t in tensors.items()
                if (not k.startswith("param.") or k in heads) and not k.startswith(adapter_moments)
            }
        buffered, buffer_state = self.buffer.snapshot()
        state = {
            "trainer": trainer_state,
            "buffer": buffer_state,
            "prequential": self.prequential.snapshot(),
            "drift": self.drift.snapshot(),
            "publisher": self.publisher.snapshot(),
            "reaction": self.reaction.snapshot(),
        }
        prefix = f"task.{self.name}."
        holdout = [e.to_builtins() for e in self.holdout.snapshot()]
        records = {f"{prefix}buffer.jsonl": buffered, f"{prefix}holdout.jsonl": holdout}
        return {prefix + k: t for k, t in tensors.items()}, state, records

    def restore(
        self, tensors: dict[str, torch.Tensor], state: dict[str, Any], records: dict[str, list[dict[str, Any]]]
    ) -> None:
        """Continue from ``snapshot``'s parts (all of the checkpoint's; this task picks its own)."""
        prefix = f"task.{self.name}."
        own = {k[len(prefix) :]: t for k, t in tensors.items() if k.startswith(prefix)}
        with self.installed(), self.own_random():  # the trainer restores the task's own generator, if any
            if self.random is None or "rng.torch" not in own:  # none, or a checkpoint from before there was one
                own["rng.torch"] = torch.get_rng_state()
            for key, param in self.trainer.slots.capture().items():
                if not self.trainer.owns_adapter:  # the shared adapter: the default task's part restored it
                    own.setdefault(f"param.{key}", param.detach().clone())
            self.publisher.check_checkpoint(state["publisher"])
            self.trainer.restore(own, state["trainer"])
            self.publisher.restore(state["publisher"])
        self.drift.restore(state["drift"])
        if "reaction" in state:  # checkpoints before tasks had reactions of their own have none
            self.reaction.restore(state["reaction"])
        self.buffer.restore(records.get(f"{prefix}buffer.jsonl", []), state["buffer"])
        holdout = records.get(f"{prefix}holdout.jsonl", [])
        self.holdout.restore([Event.from_builtins(r) for r in holdout])
        self.prequential.restore(state["prequential"])


def task_collator(base: Collator, labels: LabelMap) -> Collator:
    """A collator for another task: the same tokenizer (and its lock), that task's label map."""
    collator = copy.copy(base)
    collator.label_map = labels
    return collator
