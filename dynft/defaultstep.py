"""The default task's step on the main thread: train, score prequentially, watch for drift, react.

A mixin of ``TrainingLoop`` (``dynft.loop``), which owns the fields declared below; the other
tasks' steps are ``dynft.tasks.Task.train``. One step in order: the trainer's update on a batch
(fresh events first, then replay), the fresh events' prequential scores (their predictions came
from the forward pass before the update), the drift detectors on each event's error, loss,
label and embedding, and the reaction to what they detect (boosted steps, a retire, a new
lineage), which the publisher and the held-out window follow.
"""

from __future__ import annotations

import logging
from typing import Any

from dynft.batching import Batch
from dynft.buffer import ReplayBuffer
from dynft.drift import Detection, DriftMonitor
from dynft.evaluation import HoldoutWindow, Prequential
from dynft.metrics import TrainerMetrics
from dynft.publisher import Publisher
from dynft.reaction import DriftReaction, Response
from dynft.recorder import HistoryRecorder
from dynft.settings import Settings
from dynft.tasks import DEFAULT_TASK
from dynft.trainer import OnlineTrainer, StepResult

log = logging.getLogger("dynft.loop")  # the loop's own logger: these lines are the loop's


class DefaultStep:
    """The default task's step; ``TrainingLoop`` provides the fields below (main thread only)."""

    settings: Settings
    trainer: OnlineTrainer
    metrics: TrainerMetrics
    prequential: Prequential
    drift: DriftMonitor
    reaction: DriftReaction
    buffer: ReplayBuffer
    holdout: HoldoutWindow
    publisher: Publisher
    history: HistoryRecorder

    def _train(self, batch: Batch) -> StepResult:
        """One step on ``batch`` and what follows from it; returns the step's result."""
        result = self.trainer.step(batch)
        self._record_step(result, len(batch.events))
        if result.skipped:
            return result
        fresh = batch.events[: batch.n_fresh]
        self.metrics.task_events.labels(DEFAULT_TASK).inc(len(fresh))
        features: list[list[float] | None] = [*result.features] if result.features else [None] * len(fresh)
        for event, prediction, loss, embedding in zip(fresh, result.predictions, result.losses, features, strict=True):
            self.prequential.update(event.label, prediction, loss)
            for detection in self.drift.update(prediction != event.label, loss, event.label, embedding, event.text):
                self._on_drift(detection)
            self._react(self.reaction.observe(self.drift.seen - 1, event.label, prediction))
        self._update_gauges()
        if self.reaction.boosting:
            # Extra replay only while no fresh work waits: behind the stream, the new events teach
            # the new concept sooner than replay of what came before them (and they are served).
            for _ in range(0 if self.publisher.waiting() else self.settings.drift.boost_extra_steps):
                self._replay_step()
        elif self.reaction.after_step():
            log.info("drift reaction over after step %d", self.trainer.steps)
        return result

    def _replay_step(self) -> None:
        events = self.buffer.sample(self.settings.trainer.batch_size, *self.reaction.replay_plan())
        if events:
            self._record_step(self.trainer.step(self.trainer.collator(events, n_fresh=0)), len(events))

    def _record_step(self, result: StepResult, rows: int) -> None:
        m = self.metrics
        if result.skipped:
            m.train_skipped.labels(result.skipped).inc()
            log.warning("skipped a training step: %s (loss %s)", result.skipped, result.loss)
            return
        m.train_steps.inc()
        m.train_samples.inc(rows)
        m.step_seconds.observe(result.seconds)
        m.loss.set(result.loss)
        m.lr.set(result.lr)

    def _update_gauges(self) -> None:
        m, pq = self.metrics, self.prequential
        m.accuracy.set(pq.accuracy)
        m.task_accuracy.labels(DEFAULT_TASK).set(pq.accuracy)
        # The default task's series exist from its first step, as every other task's do; the
        # versions' values are set where versions are published (Publisher.record).
        for family in (
            m.task_events,
            m.task_drift,
            m.task_latest_version,
            m.task_serving_version,
            m.task_publish_errors,
        ):
            family.labels(DEFAULT_TASK)
        m.macro_f1.set(pq.macro_f1)
        m.preq_loss.set(pq.loss)
        m.majority.set(pq.majority_rate)
        m.buffer_events.set(len(self.buffer))
        m.buffer_bytes.set(self.buffer.nbytes)
        m.labels.set(len(self.trainer.label_map))

    def _on_drift(self, detection: Detection) -> None:
        self.metrics.drift.labels(detection.detector, detection.stream).inc()
        self.metrics.task_drift.labels(DEFAULT_TASK).inc()
        self.history.drift(detection)
        log.warning(
            "drift detected by %s on the %s stream at event %d", detection.detector, detection.stream, detection.index
        )
        self._react(self.reaction.on_detection(detection))

    def _react(self, response: Response) -> None:
        """Count what the drift reaction did; a new lineage also begins in the publisher and the held-out window."""
        for reaction in response.applied:
            self.metrics.reactions.labels(reaction).inc()
        if response.retired or "retire" in response.applied:
            log.warning("concept change confirmed: %d replayed events of the old concept retired", response.retired)
        if response.new_lineage:
            self.publisher.new_lineage()
            self.holdout.clear()  # the old concept's held-out events would judge candidates of the new one
        if response.applied:
            d = self.settings.drift
            log.info("reacting to drift with %s for %d steps", ", ".join(response.applied), d.boost_steps)

    def _publish_meta(self) -> dict[str, Any]:
        pq = self.prequential
        return {
            "events_seen": pq.seen,
            "metrics": {
                "prequential_accuracy": pq.accuracy,
                "prequential_macro_f1": pq.macro_f1,
                "prequential_loss": pq.loss,
                "majority_rate": pq.majority_rate,
            },
        }
