"""dynft's training loop with a recorder attached: the loop runs unchanged, the subclass only watches.

It records each prequential prediction with the stream index of its event, each drift
detection, and scores the phases' test slices (``PhaseProbe``) on the main thread between
two work items, right after the last event of a phase was trained on.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.quality.methods import PhaseProbe, trainer_predict
from benchmarks.quality.streams import Stream, index_of
from dynft.drift import Detection
from dynft.evaluation import Prequential
from dynft.loop import TrainingLoop, Work
from dynft.settings import Settings


class RecordingPrequential(Prequential):
    """Prequential metrics that also keep every (truth, prediction) pair in order."""

    def __init__(self, window: int) -> None:
        super().__init__(window)
        self.log: list[tuple[str, str | None]] = []

    def update(self, truth: str, prediction: str | None, loss: float) -> None:
        self.log.append((truth, prediction))
        super().update(truth, prediction, loss)


class RecordingLoop(TrainingLoop):
    def __init__(self, settings: Settings, stream: Stream) -> None:
        super().__init__(settings)
        self.prequential: RecordingPrequential = RecordingPrequential(settings.evaluation.window)
        self.probe = PhaseProbe(stream)
        self.recorded: list[tuple[int, str, str | None]] = []  # (stream index, truth, prediction)
        self._detected: list[Detection] = []
        self.started_at = 0.0

    def startup(self) -> None:
        super().startup()
        self.started_at = time.perf_counter()  # the model is loaded: the stream starts now

    def _complete(self, work: Work) -> None:
        seen = self.prequential.seen
        super()._complete(work)
        fresh = work.batch.events[: work.batch.n_fresh] if work.batch is not None else []
        new = self.prequential.log[seen:]
        if new:  # the step was not skipped: one prediction per fresh event, in order
            self.recorded += [(index_of(e.id), t, p) for e, (t, p) in zip(fresh, new, strict=True)]
        done = [index_of(e.id) for e in [*fresh, *work.held_out]]
        if done:
            self.probe.advance(max(done) + 1, trainer_predict(self.trainer))

    def _on_drift(self, detection: Detection) -> None:
        self._detected.append(detection)
        super()._on_drift(detection)

    def detections(self) -> list[dict[str, Any]]:
        """Detections with the stream index of the event that triggered each."""
        positions = [r[0] for r in self.recorded]
        return [
            {"position": positions[min(d.index, len(positions) - 1)], "stream": d.stream, "detector": d.detector}
            for d in self._detected
        ]

    def summary(self) -> dict[str, Any]:
        def sample(name: str, **labels: str) -> int:
            return int(self.metrics_registry.get_sample_value(name, labels) or 0)

        reactions = self.settings.drift.reactions
        return {
            "steps": self.trainer.steps,
            "skipped_steps": self.trainer.skipped,
            "rows_trained": sample("dynft_train_samples_total"),
            "versions_promoted": sample("dynft_adapter_versions_total", decision="promoted"),
            "versions_rejected": sample("dynft_adapter_versions_total", decision="rejected"),
            "serving_version": self.publisher.serving_version,
            "drift_reactions": {r: sample("dynft_drift_reactions_total", reaction=r) for r in reactions},
            "buffer_events": len(self.buffer),
        }
