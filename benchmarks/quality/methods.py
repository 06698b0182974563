"""The methods compared on a stream; each run is one job that returns a ``Run``.

- ``dynft``, ``dynft no replay``, ``dynft + anchor``: dynft's real training loop
  (``dynft.loop.TrainingLoop``: file source, replay buffer, trainer, prequential evaluation,
  drift detectors and reactions, publisher and promotion gate) on the stream written to a
  JSON Lines file; a subclass only records what happens.
- ``static``: dynft's trainer learns the first 10% of the stream test-then-train, then
  ``fit_epochs`` more epochs over it, then is frozen.
- ``periodic retrain``: as static, and then ``periodic_refits`` times, evenly spaced over the
  stream, a fresh LoRA adapter is fitted on everything seen so far; frozen in between.
- ``river TF-IDF + LR`` and ``river BoW + NB``: river's online text classifiers.

Every method is scored prequentially (predict, then learn) on the same events: the events
dynft does not hold out for its gate (10%, by a hash of the id); nobody trains on the others.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.quality.streams import Stream
from benchmarks.quality.suites import Suite, dynft_overrides

Predict = Callable[[list[str]], list[str | None]]
DYNFT_VARIANTS = {
    "dynft": "dynft",
    "dynft no replay": "no-replay",
    "dynft + anchor": "anchor",
    "dynft + LwF": "lwf",  # these two only in the forgetting table (benchmarks.quality.forgetting)
    "dynft + EWC": "ewc",
}
RIVER_METHODS = ("river TF-IDF + LR", "river BoW + NB")
METHODS = ("dynft", "dynft no replay", "dynft + anchor", "static", "periodic retrain", *RIVER_METHODS)
BATCH = 16


@dataclass
class Run:
    """What one method did on one stream."""

    stream: str
    method: str
    positions: list[int] = field(default_factory=list)  # stream index of each prequential prediction
    truths: list[str] = field(default_factory=list)
    predictions: list[str | None] = field(default_factory=list)
    phase_end: list[float | None] = field(default_factory=list)  # test-slice accuracy right after each phase
    final: list[float] = field(default_factory=list)  # test-slice accuracy of every phase at the end
    detections: list[dict[str, Any]] = field(default_factory=list)  # {"position", "stream", "detector"}
    seconds: float = 0.0  # wall time, the benchmark's own test-slice scoring excluded
    events: int = 0  # stream events processed
    trained: int = 0  # events trained on
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self, position: int, truth: str, prediction: str | None) -> None:
        self.positions.append(position)
        self.truths.append(truth)
        self.predictions.append(prediction)


class PhaseProbe:
    """Scores each phase's test slice right after the phase ends, and every slice at the end."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.phase_end: list[float | None] = [None] * len(stream.phases)
        self.seconds = 0.0
        self._next = 0

    def advance(self, done: int, predict: Predict) -> None:
        """The events before stream index ``done`` have all been learned from."""
        while self._next < len(self.stream.phases) - 1 and done >= self.stream.phase_end(self._next):
            self.phase_end[self._next] = self.score(self._next, predict)
            self._next += 1

    def finish(self, predict: Predict) -> list[float]:
        final = [self.score(i, predict) for i in range(len(self.stream.phases))]
        self.phase_end[-1] = final[-1]
        return final

    def score(self, phase: int, predict: Predict) -> float:
        started = time.perf_counter()
        test = self.stream.phases[phase].test
        predicted = predict([text for text, _ in test])
        self.seconds += time.perf_counter() - started
        return sum(p == label for p, (_, label) in zip(predicted, test, strict=True)) / max(1, len(test))


def learned_indices(stream: Stream, holdout_fraction: float) -> list[int]:
    """Stream indices every method learns from: those dynft does not hold out."""
    from dynft.evaluation import is_held_out

    return [
        i for i, (text, _) in enumerate(stream.events) if not is_held_out(stream.event_id(i), text, holdout_fraction)
    ]


# -- dynft: the real loop --------------------------------------------------------------------


def run_dynft(stream: Stream, suite: Suite, method: str) -> Run:
    from benchmarks.quality.recording import RecordingLoop
    from dynft.settings import load_settings

    run = Run(stream.name, method, events=len(stream.events))
    with tempfile.TemporaryDirectory(prefix="dynft-quality-") as tmp:
        path = write_stream(stream, Path(tmp) / "stream.jsonl")
        overrides = dynft_overrides(suite, DYNFT_VARIANTS[method]) | {
            "state_dir": str(Path(tmp) / "state"),
            "source.uri": f"file:{path}",
            "source.exit_at_end": True,
        }
        loop = RecordingLoop(load_settings(overrides=overrides), stream)
        loop.run()
        run.seconds = time.perf_counter() - loop.started_at - loop.probe.seconds
        run.final = loop.probe.finish(trainer_predict(loop.trainer))
    run.phase_end = loop.probe.phase_end
    for position, truth, prediction in loop.recorded:
        run.record(position, truth, prediction)
    run.trained = len(run.positions)
    run.detections = loop.detections()
    run.extra = loop.summary()
    return run


def write_stream(stream: Stream, path: Path) -> Path:
    import json

    with open(path, "w", encoding="utf-8") as fh:
        for i, (text, label) in enumerate(stream.events):
            fh.write(json.dumps({"id": stream.event_id(i), "text": text, "label": label}) + "\n")
    return path


def trainer_predict(trainer: Any) -> Predict:
    """Predictions of a dynft trainer's live weights (None before it knows any label)."""
    from dynft.events import Event

    def predict(texts: list[str]) -> list[str | None]:
        labels = trainer.exported_labels()
        if not labels:
            return [None] * len(texts)
        events = [Event(id=f"probe-{i}", text=t, label="?") for i, t in enumerate(texts)]
        return list(trainer.predict(events, labels))

    return predict


# -- static and periodic retrain: dynft's trainer without the loop ------------------------------


def build_trainer(suite: Suite, tmp: str) -> Any:
    import torch

    from dynft.settings import load_settings
    from dynft.trainer import build_trainer as build

    settings = load_settings(overrides=dynft_overrides(suite, "dynft") | {"state_dir": tmp})
    torch.set_num_threads(suite.threads)
    return build(settings.model, settings.adapter, settings.trainer)


def run_frozen(stream: Stream, suite: Suite, method: str) -> Run:
    """Static (``refit_every`` None) or periodic retrain."""
    from dynft.events import Event
    from dynft.settings import EvaluationSettings

    run = Run(stream.name, method, events=len(stream.events))
    probe = PhaseProbe(stream)
    learned = learned_indices(stream, EvaluationSettings().holdout_fraction)
    events = {i: Event(id=stream.event_id(i), text=stream.events[i][0], label=stream.events[i][1]) for i in learned}
    n = len(stream.events)
    cut = n // 10
    refits = [k * n // (suite.periodic_refits + 1) for k in range(1, suite.periodic_refits + 1)]
    refits = [r for r in refits if cut < r < n] if method == "periodic retrain" else []
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="dynft-quality-") as tmp:
        trainer = build_trainer(suite, tmp)
        predict = trainer_predict(trainer)
        started = time.perf_counter()
        head = [i for i in learned if i < cut]
        for chunk in chunks(head, BATCH):  # the first 10%: test-then-train
            result = trainer.step(trainer.collator([events[i] for i in chunk], n_fresh=len(chunk)))
            for i, prediction in zip(chunk, result.predictions, strict=True):
                run.record(i, events[i].label, prediction)
            probe.advance(chunk[-1] + 1, predict)
        fit(trainer, [events[i] for i in head], suite.fit_epochs, rng, fresh=False)
        bounds = [*refits, n]
        start = cut
        for bound in bounds:  # frozen until the next refit
            for chunk in chunks([i for i in learned if start <= i < bound], 64):
                for i, prediction in zip(chunk, predict([events[i].text for i in chunk]), strict=True):
                    run.record(i, events[i].label, prediction)
                probe.advance(chunk[-1] + 1, predict)
            probe.advance(bound, predict)
            if bound < n:
                fit(trainer, [events[i] for i in learned if i < bound], suite.refit_epochs, rng, fresh=True)
            start = bound
        run.seconds = time.perf_counter() - started - probe.seconds
        run.final = probe.finish(predict)
    run.phase_end = probe.phase_end
    run.trained = len(head) if not refits else len([i for i in learned if i < refits[-1]])
    run.extra = {"refits_at": refits, "fit_epochs": suite.fit_epochs, "refit_epochs": suite.refit_epochs}
    return run


def chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def fit(trainer: Any, events: list[Any], epochs: int, rng: random.Random, fresh: bool) -> None:
    """``epochs`` shuffled passes over ``events``; ``fresh`` starts from a new adapter and head."""
    if fresh:
        trainer.reset_adapter()
        trainer.steps = 0
    trainer.settings.warmup_steps = max(1, epochs * math.ceil(len(events) / BATCH) // 10)
    for _ in range(epochs):
        order = list(events)
        rng.shuffle(order)
        for i in range(0, len(order), BATCH):
            trainer.step(trainer.collator(order[i : i + BATCH], n_fresh=0))


# -- river ---------------------------------------------------------------------------------------


def make_river(method: str) -> Any:
    from river import feature_extraction, linear_model, multiclass, naive_bayes

    if method == "river TF-IDF + LR":
        return feature_extraction.TFIDF() | multiclass.OneVsRestClassifier(linear_model.LogisticRegression())
    return feature_extraction.BagOfWords() | naive_bayes.MultinomialNB()


def run_river(stream: Stream, suite: Suite, method: str) -> Run:
    from dynft.settings import EvaluationSettings

    run = Run(stream.name, method, events=len(stream.events))
    probe = PhaseProbe(stream)
    model = make_river(method)

    def predict(texts: list[str]) -> list[str | None]:
        return [model.predict_one(t) for t in texts]

    started = time.perf_counter()
    for i in learned_indices(stream, EvaluationSettings().holdout_fraction):
        text, label = stream.events[i]
        run.record(i, label, model.predict_one(text))
        model.learn_one(text, label)
        probe.advance(i + 1, predict)
    probe.advance(len(stream.events), predict)
    run.seconds = time.perf_counter() - started - probe.seconds
    run.final = probe.finish(predict)
    run.phase_end = probe.phase_end
    run.trained = len(run.positions)
    return run


def run_method(stream: Stream, suite: Suite, method: str) -> Run:
    if method in DYNFT_VARIANTS:
        return run_dynft(stream, suite, method)
    if method in RIVER_METHODS:
        return run_river(stream, suite, method)
    return run_frozen(stream, suite, method)
