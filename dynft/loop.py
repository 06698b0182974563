"""The training service: source -> buffer -> trainer -> registry, with a uvicorn-like lifecycle.

Two threads do the work. The *batching* thread takes raw records from the intake, decodes
them (bad ones go to the dead-letter sink), sets the held-out share aside, draws replay from
the buffer and tokenizes: each result is a ``Work`` item. The *main* thread completes Work in
order: trains, adds the fresh events to the buffer and the held-out ones to their window,
feeds the prequential metrics and drift monitor, records outcomes in the ledger and the
records' positions as processed; it publishes versions through the gate and writes
checkpoints, after which the source may commit the positions they cover (at-least-once).
``startup`` / ``main_loop`` / ``shutdown`` mirror uvicorn.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field

import torch
from prometheus_client import CollectorRegistry

from dynft.batching import Batch, Collator
from dynft.behind import FeedLag
from dynft.buffer import ReplayBuffer
from dynft.checkpoint import CheckpointStore
from dynft.deadletter import DeadLetterSink, open_dead_letter_sink
from dynft.defaultstep import DefaultStep
from dynft.drift import DriftMonitor
from dynft.election import Election
from dynft.errors import TermLostError
from dynft.evaluation import HoldoutWindow, Prequential
from dynft.events import REASONS, Event
from dynft.freshwait import FreshWait
from dynft.ledger import Ledger, LedgerPruner
from dynft.loopstate import LoopState
from dynft.metrics import TrainerMetrics
from dynft.publisher import Publisher
from dynft.reaction import DriftReaction
from dynft.recorder import HistoryRecorder
from dynft.registry import AdapterRegistry
from dynft.routing import Router
from dynft.runtime import tune_gc
from dynft.serving.prototypes import SHOTS_FILE, ShotLog
from dynft.settings import Settings
from dynft.sources import Intake, Positions, Record, furthest, open_source
from dynft.statedisk import StateDisk
from dynft.taskloop import split_by_task
from dynft.tasks import DEFAULT_TASK, Task, TaskDirectory, TaskWork
from dynft.term import TermView, fence_commits
from dynft.trainer import OnlineTrainer, build_trainer

log = logging.getLogger(__name__)


@dataclass
class Work:
    """What the batching thread made of one take from the intake."""

    batch: Batch | None  # None when every record was held out or dead-lettered
    held_out: list[Event] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)  # ledger keys of dead-lettered records
    records: list[Record] = field(default_factory=list)  # every record taken (their positions)
    buffered: list[Event] = field(default_factory=list)  # older fresh events sent to replay (freshest first)
    tasks: list[TaskWork] = field(default_factory=list)  # the other tasks' shares (dynft.tasks)
    arrived: float = field(default_factory=time.time)  # when taken from the intake (freshness starts here)
    lineage: int = 0  # the drift reaction's lineage when made: replay of an older one is drawn again


class TrainingLoop(DefaultStep, LoopState):
    """Runs the trainer until ``should_exit`` is set (by a signal, or at the end of a finite source)."""

    def __init__(
        self,
        settings: Settings,
        metrics_registry: CollectorRegistry | None = None,
        colocated: bool = False,
        election: Election | None = None,
    ):
        """``election``: one that outlives this loop (``dynft train``'s, across sharded lives); else
        the loop makes, starts and closes its own when ``kafka.election`` is on."""
        self.settings = settings
        self.colocated = colocated
        self.metrics_registry = metrics_registry or CollectorRegistry()
        self.metrics = TrainerMetrics(self.metrics_registry)
        self.should_exit = threading.Event()
        self.trainer: OnlineTrainer
        self.publisher: Publisher
        self.prequential = Prequential(settings.evaluation.window)
        self.holdout = HoldoutWindow(settings.evaluation.holdout_window)
        b = settings.buffer
        self.buffer = ReplayBuffer(b.max_events, b.max_bytes, b.strategy, b.recency_half_life, settings.trainer.seed)
        d = settings.drift
        self.drift = DriftMonitor.from_settings(d, settings.checkpoint.drift_history)
        self.metrics.declare(self.drift.streams, REASONS, list(d.reactions))
        self.reaction: DriftReaction  # made with the trainer it acts on (startup)
        self.checkpoints = CheckpointStore(settings.state_dir / "checkpoints", settings.checkpoint.keep)
        self.ledger = Ledger(settings.state_dir / "ledger.db")
        lg = settings.ledger
        self.pruner = LedgerPruner(self.ledger.path, lg.retention_days, lg.max_rows, lg.prune_interval_s)
        self.disk = StateDisk(max_delay_s=settings.checkpoint.disk_full_retry_max_s)  # see _backpressure
        self.positions: Positions = {}  # furthest processed position per stream
        self._uncommitted = False
        self._checkpoint_at = (0, time.monotonic())  # (step, time) of the last checkpoint
        self._work: queue.Queue[Work] = queue.Queue(maxsize=2)
        self._batcher = threading.Thread(target=self._batching, name="dynft-batcher", daemon=True)
        self._batcher_done = threading.Event()
        self._batcher_error: BaseException | None = None
        self._leftover: list[Work] = []  # made after the main loop stopped taking work
        self._status_at = 0.0
        self._status_events = 0
        self._held = False  # the batching thread takes nothing from the intake (see _backpressure)
        self._fresh_wait: FreshWait[Event] = FreshWait(settings.tasks.fill_wait_s)  # batching thread only
        t = settings.trainer
        self._lag = FeedLag(t.freshest_first_backlog, t.freshest_first_after_s)  # batching thread only
        self.intake: Intake | None = None
        self.sink: DeadLetterSink | None = None
        self.router: Router | None = None  # used by the batching thread only
        self.shots: ShotLog | None = None  # the server's fast path (batching thread only; made at startup)
        # Tasks other than ``default`` (whose parts are this loop's own fields): created by the
        # main thread on their first work; their collators and buffers may be made first by the
        # batching thread (_task_parts, under _parts_lock).
        self.tasks: dict[str, Task] = {}
        self.task_directory: TaskDirectory | None = None
        self._task_parts_made: dict[str, tuple[Collator, ReplayBuffer]] = {}
        self._parts_lock = threading.Lock()
        self.started = threading.Event()
        # kafka.election: this trainer trains only while it holds the term (dynft.election), and
        # commits only positions whose events are in a version on the versions topic (_covered).
        self._owns_election = election is None and settings.kafka.election
        if self._owns_election:
            election = Election(settings, f"{socket.gethostname()}:{os.getpid()}")
        self.election = election
        self.term: TermView | None = None  # the term this loop runs under (one life, when sharded)
        self.reassigned = False  # sharded: the loop ended because the partitions were assigned anew
        self._covered: Positions = {}
        self._pending_from: dict[str, Positions] = {}  # see LoopState._note_covered
        self.history = HistoryRecorder(settings.state_dir, settings.console_show_texts)  # the console's curves

    # -- lifecycle -----------------------------------------------------------------------

    def startup(self) -> None:
        s = self.settings
        threads = s.trainer.threads or max(1, (os.cpu_count() or 1) - (s.server.threads if self.colocated else 0))
        torch.set_num_threads(threads)
        registry = AdapterRegistry(s.registry_dir, s.registry.keep_last, s.registry.keep_serving_history)
        removed = registry.clean_staging()
        if removed:
            log.warning("removed %d half-written version(s) from an earlier crash", len(removed))
        self.trainer = build_trainer(s.model, s.adapter, s.trainer)
        self.task_directory = TaskDirectory(self.trainer.label_map, s.tasks.max_tasks)
        self.trainer.capture_features = self.drift.wants_embeddings
        self.reaction = DriftReaction(s.drift, self.trainer, self.buffer)
        if not self._hold_term():  # a standby told to stop
            return
        self.publisher = Publisher(registry, self.trainer, self.holdout, s, self.metrics, term=self.term)
        self.publisher.waiting = self.work_waiting
        if self.shared:
            self.publisher.clock = self.joint_steps
        source = open_source(s.source, s.kafka, self.metrics_registry, s.events.max_record_bytes)
        if self.term is not None:
            fence_commits(source, self.term)
        self._resume(source, registry)
        if s.server.prototypes:
            self.shots = ShotLog(s.state_dir / SHOTS_FILE, s.server.prototype_shots)
        self.sink = open_dead_letter_sink(source, s.kafka, s.dead_letter_path, s.source, self.disk.write_refused)
        self.router = Router(
            s,
            self.trainer.label_map,
            self.sink,
            self.metrics,
            self.history.dead_letter,
            self.task_directory,
            partition_of=self.term.election.partition_of if self.term is not None and s.kafka.sharded else None,
        )
        # Before the consumer joins its group: the full collection holds the GIL for about half a
        # second, and a kafka-python 3.0 consumer stalled like that mid-join was seen never to rejoin.
        tune_gc()
        self.intake = intake = Intake(source, s.source.queue_size, max_bytes=s.source.queue_max_bytes)
        intake.start()
        self.pruner.start()
        self._batcher.start()
        log.info(
            "training %s on %s from %s (%d threads); registry %s",
            self.trainer.base_model_path,
            self.trainer.device,
            s.source.uri,
            threads,
            registry.root,
        )
        self.started.set()

    def run(self) -> None:
        try:
            self.startup()
            self.main_loop()
        finally:
            self.shutdown()

    def main_loop(self) -> None:
        while not self.should_exit.is_set():
            if self.term is not None and not self.term.current():
                if self.term.election.lost:
                    raise TermLostError(f"trainer epoch {self.term.epoch} lost its term; standing by needs a restart")
                log.info("the partitions were assigned anew: this life of the trainer ends, the next one resumes")
                self.reassigned = True
                break
            try:
                work = self._work.get(timeout=0.2)
            except queue.Empty:
                work = None
            if work is not None:
                self._complete(work)
            elif self._batcher_done.is_set() and self._work.empty():
                failure = self._batcher_error or (self.intake.error if self.intake else None)
                if failure is not None:
                    raise failure
                if self.settings.source.exit_at_end:
                    log.info("source %s is exhausted; stopping", self.settings.source.uri)
                    break
            self._publish_all()
            self._resync_feeds()
            self._note_covered()
            self._maybe_checkpoint()
            self._maybe_status()

    def work_waiting(self) -> bool:
        """Whether a batch waits for the main thread (publishing now would delay training)."""
        return not self._work.empty()

    def shutdown(self) -> None:
        """Stop taking input, finish what was already taken, publish, checkpoint, commit, close."""
        self.should_exit.set()
        if self._batcher.is_alive():
            self._batcher.join(10.0)
        if self.started.is_set():
            while not self._work.empty():
                self._complete(self._work.get_nowait())
            for work in self._leftover:
                self._complete(work)
            self._publish_all(force=True)
            self._note_covered()
            self._maybe_checkpoint(force=True)
            self._maybe_status(force=True)
            log.info("trainer stopped after %d steps", self.joint_steps())  # every task's
        if self.intake is not None:
            self.intake.stop()  # after the last checkpoint: the source makes its final commit
        if self.sink is not None:
            self.sink.close()
        self.pruner.stop()
        self.ledger.close()
        self._close_replication()

    # -- batching thread -----------------------------------------------------------------

    def _batching(self) -> None:
        try:
            while not self.should_exit.is_set() and not self._intake().finished:
                self._hand_over(self._next_work())
            self._hand_over(self._waited_work(flush=True))  # what still waits to fill a task's share
        except BaseException as exc:  # re-raised on the main thread
            log.exception("the batching thread failed")
            self._batcher_error = exc
        finally:
            self._batcher_done.set()

    def _hand_over(self, work: Work | None) -> None:
        while work is not None:
            try:
                self._work.put(work, timeout=0.2)
                return
            except queue.Full:
                if self.should_exit.is_set():  # the main loop stopped taking: shutdown completes it
                    self._leftover.append(work)
                    return

    def _intake(self) -> Intake:
        if self.intake is None:
            raise RuntimeError("the intake is used before startup")
        return self.intake

    def _next_work(self) -> Work | None:
        if self._backpressure():
            self.should_exit.wait(0.1)
            return None
        size = self.settings.trainer.batch_size
        # At least one fresh event a step: a ratio near 1 rounds to a whole batch of replay, and a
        # take of nothing stalled the loop.
        replay = min(round(size * self.settings.buffer.replay_ratio), size - 1, self._replayable())
        intake = self._intake()
        take = size - replay
        behind = self._lag.behind(intake.queued, intake.dry)
        if behind:  # behind the feed: take all, train on the newest (below)
            take = intake.queued
        records = intake.take(take, min(self.settings.trainer.fresh_wait_s, self._fresh_wait.patience()))
        self.metrics.intake_queue.set(intake.queued)
        self.metrics.intake_queue_bytes.set(intake.queued_bytes)
        if not records:
            if self.shots is not None:
                self.shots.idle()
            return self._waited_work(flush=False)
        self._fresh_wait.taken(records)
        work = Work(None, lineage=self.reaction.lineage)  # read before replay is drawn
        fresh = self._route(records, work)
        self._add_waited(work, flush=not intake.queued, behind=behind)
        if len(fresh) > size - replay:
            work.buffered = [event for _, event in fresh[: len(fresh) - (size - replay)]]
            fresh = fresh[len(fresh) - (size - replay) :]
        if fresh:
            replayed = self.buffer.sample(size - len(fresh), *self.reaction.replay_plan())
            work.batch, dead = self._router().collate(self.trainer.collator, fresh, replayed)
            work.dead += [key for _, key in dead]
        return work

    def _waited_work(self, flush: bool) -> Work | None:
        """Work of the waiting events that are due although nothing new was taken (``None``: none are)."""
        if not len(self._fresh_wait):
            return None
        work = Work(None, lineage=self.reaction.lineage)
        self._add_waited(work, flush, behind=False)
        return work if work.tasks or work.records else None

    def _backpressure(self) -> bool:
        """Whether the batching thread must take nothing from the intake now (which then fills and
        pauses its source): the state disk refuses writes (a full disk is no record's fault, so
        nothing is dead-lettered for it; ``_maybe_checkpoint`` retries), or the outcomes waiting
        in memory for a ledger commit reached their bound."""
        if self.disk.refusing:
            why = "the state disk refuses writes"
        elif self.ledger.pending >= self.settings.ledger.max_pending_rows:
            why = f"{self.ledger.pending} outcomes wait for a ledger commit"
        else:
            why = ""
        held = bool(why)
        if held != self._held:  # _held: the batching thread's own
            log.warning("intake %s", f"paused: {why}" if held else "resumed")
            self.metrics.intake_paused.set(int(held))
            self._held = held
        if held:
            self.metrics.intake_queue.set(self._intake().queued)
        return held

    def _router(self) -> Router:
        if self.router is None:
            raise RuntimeError("the router is used before startup")
        return self.router

    def _route(self, records: list[Record], work: Work) -> list[tuple[Record, Event]]:
        """Decode records; dead-letter the bad ones, hold out a share, return the default task's to
        train on (the other tasks' shares go to ``work.tasks``)."""
        router = self._router()
        routed = router.route(records)
        fresh, held = split_by_task(routed.fresh), split_by_task(routed.held_out)
        held_out, dead = router.screen(self.trainer.collator, held.pop(DEFAULT_TASK, []))
        work.held_out += held_out
        work.dead += [key for _, key in routed.dead + dead]
        for name in dict.fromkeys([*fresh, *held]):
            if name != DEFAULT_TASK:  # held-out events now; fresh ones wait to fill a step (_add_waited)
                self._fresh_wait.hold(name, fresh.get(name, []), work.arrived)
                if name in held:
                    share, task_dead = self._task_work(name, [], held[name])
                    work.tasks.append(share)
                    work.dead += task_dead
        if self.shots is not None:  # before training: the server's fast path learns from them at once
            # Numbered as versions are (the publisher's lineage, one int read across threads), so the
            # server tells an older version from a current one.
            self.shots.offer((event for _, event in fresh.get(DEFAULT_TASK, [])), self.publisher.lineage)
        return fresh.get(DEFAULT_TASK, [])

    # -- main thread ---------------------------------------------------------------------

    def _complete(self, work: Work) -> None:
        outcomes: list[tuple[str, str]] = [(key, "dead_lettered") for key in work.dead]
        if work.batch is not None:
            self._redraw_stale_replay(work)
            fresh = work.batch.events[: work.batch.n_fresh]
            result = self._train(work.batch)
            status = "skipped" if result.skipped else "trained"
            if not result.skipped:  # a non-finite step may be these events' fault: replayed, they would skip later ones
                self.buffer.add_many(fresh)
                self.publisher.trained(work.arrived, fresh, result.predictions)
            outcomes += [(e.id, status) for e in fresh]
            self.metrics.events.labels(status).inc(len(fresh))
        if work.buffered:  # never trained fresh, but kept for replay: every event has an outcome
            self.buffer.add_many(work.buffered)
            outcomes += [(e.id, "buffered") for e in work.buffered]
            self.metrics.events.labels("buffered").inc(len(work.buffered))
        for event in work.held_out:
            self.holdout.add(event)
        outcomes += [(e.id, "held_out") for e in work.held_out]
        self.metrics.events.labels("held_out").inc(len(work.held_out))
        for share in work.tasks:
            outcomes += self._complete_task(share, work.arrived)
        self._reshare_buffers()
        self.metrics.events.labels("dead_lettered").inc(len(work.dead))
        self.ledger.record(outcomes)
        self._note_pending(self.positions)
        self.positions = furthest(work.records, self.positions)
        self._uncommitted = True

    def _redraw_stale_replay(self, work: Work) -> None:
        """Work made before a reset replays the old lineage's buffer: keep its fresh rows, draw replay again."""
        batch = work.batch
        if batch is None or work.lineage == self.reaction.lineage:
            return
        fresh = batch.events[: batch.n_fresh]
        replayed = self.buffer.sample(len(batch.events) - len(fresh), *self.reaction.replay_plan())
        work.batch, work.lineage = self.trainer.collator(fresh + replayed, n_fresh=len(fresh)), self.reaction.lineage
