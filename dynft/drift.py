"""Drift detection on the prequential streams, with river's detectors.

By default ADWIN watches the 0/1 error of each fresh prediction and PageHinkley (``mode="up"``)
watches its loss. Any detector of ``river.drift`` or ``river.drift.binary`` can be chosen by
name, with its constructor parameters.

Only degradation counts: ADWIN also reports a *fall* of the error (the model getting better,
as it does all the time while it learns); such changes are not drift to react to and are
ignored here, by comparing ADWIN's estimate before and after it cuts its window.

>>> import random
>>> rng = random.Random(7)
>>> ph = {"min_instances": 100, "delta": 0.25, "threshold": 60.0, "mode": "up"}
>>> monitor = DriftMonitor("ADWIN", {}, "PageHinkley", ph)
>>> before, after = 2000, 1000
>>> stream = [(rng.random() < 0.1, 0.3) for _ in range(before)] + [(rng.random() < 0.8, 2.5) for _ in range(after)]
>>> hits = [d for error, loss in stream for d in monitor.update(error, loss)]
>>> sorted({d.stream for d in hits}), all(d.index >= 2000 for d in hits)
(['error', 'loss'], True)
"""

from __future__ import annotations

import inspect
import math
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Protocol

from river import drift
from river.base import BinaryDriftDetector, DriftDetector

from dynft.errors import ConfigError
from dynft.settings import DriftSettings
from dynft.shift import WindowedShift


class Detector(Protocol):
    """What dynft uses of a river detector."""

    drift_detected: bool

    def update(self, x: Any) -> Any: ...


@dataclass(frozen=True)
class Detection:
    stream: str  # "error", "loss", "label", "input" or "representation"
    detector: str  # river class name
    index: int  # position of the triggering event in the prequential stream


def available_detectors() -> dict[str, type]:
    """River's drift detectors by class name."""
    found: dict[str, type] = {}
    for module in (drift, drift.binary):
        for name, obj in vars(module).items():
            is_detector = inspect.isclass(obj) and issubclass(obj, DriftDetector | BinaryDriftDetector)
            if is_detector and name not in ("DummyDriftDetector", "NoDrift"):
                found[name] = obj
    found["NoDrift"] = drift.NoDrift
    return found


def make_detector(name: str, params: dict[str, Any]) -> Detector:
    """Instantiate a river detector by class name; bad names and parameters raise ``ConfigError``."""
    known = available_detectors()
    if name == "NoDrift":  # the off switch: the parameters kept for a detector switched back on are not its
        off: Detector = known[name]()
        return off
    cls = known.get(name)
    if cls is None:
        raise ConfigError(f"drift detector {name!r} is not in river.drift (known: {', '.join(sorted(known))})")
    try:
        detector: Detector = cls(**params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"drift detector {name} rejects parameters {params}: {exc}") from exc
    return detector


class DriftMonitor:
    """Feeds the error and loss streams to their detectors; ``update`` returns the detections it caused."""

    def __init__(
        self,
        error_detector: str,
        error_params: dict[str, Any],
        loss_detector: str,
        loss_params: dict[str, Any],
        keep: int = 2000,
        label: tuple[str, dict[str, Any], int] | None = None,
        representation: tuple[str, dict[str, Any], int, int] | None = None,  # detector, params, dims, window
        inputs: tuple[str, dict[str, Any], int] | None = None,
    ):
        self.error_name, self.loss_name = error_detector, loss_detector
        # Optional detectors on the labels, the texts and their token embeddings; "NoDrift" (or None) turns one off.
        self._label_spec = label if label is not None and label[0] != "NoDrift" else None
        self._repr_spec = representation if representation is not None and representation[0] != "NoDrift" else None
        self._label = LabelShiftDetector(*self._label_spec) if self._label_spec else None
        self._input_spec = inputs if inputs is not None and inputs[0] != "NoDrift" else None
        self._input = InputShiftDetector(*self._input_spec) if self._input_spec else None
        self._repr: RepresentationShiftDetector | None = None  # made at the first embedding (its width)
        if self._repr_spec is not None:
            make_detector(*self._repr_spec[:2])  # bad names and parameters fail now, not at the first event
        self._specs = (error_detector, error_params, loss_detector, loss_params)
        self._error = make_detector(error_detector, error_params)
        self._loss = make_detector(loss_detector, loss_params)
        self._recent: deque[tuple[bool, float, str | None]] = deque(maxlen=keep)  # to rebuild detectors after a restart
        if isinstance(self._loss, BinaryDriftDetector):
            raise ConfigError(f"drift.loss_detector {loss_detector} only takes 0/1 input; the loss is continuous")
        self.seen = 0
        self.detections = 0
        self.history: deque[Detection] = deque(maxlen=100)  # the most recent detections

    def snapshot(self) -> dict[str, Any]:
        return {"seen": self.seen, "detections": self.detections, "recent": list(self._recent)}

    @classmethod
    def from_settings(cls, d: DriftSettings, keep: int = 2000) -> DriftMonitor:
        """The monitor the ``drift`` settings describe: error and loss, and label, input, representation unless off."""
        representation = (
            d.representation_detector,
            d.representation_params,
            d.representation_dims,
            d.representation_window,
        )
        labels = (d.label_detector, d.label_params, d.label_window)
        inputs = (d.input_detector, d.input_params, d.input_window)
        return cls(
            d.error_detector, d.error_params, d.loss_detector, d.loss_params, keep, labels, representation, inputs
        )

    @property
    def streams(self) -> dict[str, str]:
        """The detector watching each stream, for metrics."""
        out = {"error": self.error_name, "loss": self.loss_name}
        if self._label_spec:
            out["label"] = self._label_spec[0]
        if self._input_spec:
            out["input"] = self._input_spec[0]
        if self._repr_spec:
            out["representation"] = self._repr_spec[0]
        return out

    @property
    def wants_embeddings(self) -> bool:
        return self._repr_spec is not None

    def restore(self, state: dict[str, Any]) -> None:
        """Warm fresh detectors on the recent streams (river detectors have no pickle-free state).

        The input and representation detectors start afresh: keeping texts or embeddings would
        make checkpoints large.
        Checkpoints written before the label detector existed hold (error, loss) pairs.
        """
        error_name, error_params, loss_name, loss_params = self._specs
        self._error = make_detector(error_name, error_params)
        self._loss = make_detector(loss_name, loss_params)
        self._label = LabelShiftDetector(*self._label_spec) if self._label_spec else None
        self._input = InputShiftDetector(*self._input_spec) if self._input_spec else None
        for error, loss, *rest in state["recent"]:
            label = rest[0] if rest else None
            self._update_error(error)
            self._loss.update(loss)
            if self._label is not None and label is not None:
                self._label.update(label)
            self._recent.append((error, loss, label))
        self.seen, self.detections = state["seen"], state["detections"]

    def update(
        self, error: bool, loss: float, label: str | None = None, embedding: Any = None, text: str | None = None
    ) -> list[Detection]:
        """Feed one prequential event: its 0/1 error, loss, and optionally its label, mean token embedding and text."""
        self._recent.append((error, loss, label))
        found = []
        if self._update_error(error):
            found.append(Detection("error", self.error_name, self.seen))
        self._loss.update(loss)
        if self._loss.drift_detected:
            found.append(Detection("loss", self.loss_name, self.seen))
        if self._label_spec is not None and self._label is not None and label is not None and self._label.update(label):
            found.append(Detection("label", self._label_spec[0], self.seen))
        if self._input_spec is not None and self._input is not None and text is not None and self._input.update(text):
            found.append(Detection("input", self._input_spec[0], self.seen))
        if self._repr_spec is not None and embedding is not None:
            if self._repr is None:
                name, params, dims, window = self._repr_spec
                self._repr = RepresentationShiftDetector(name, params, len(embedding), dims, window)
            if self._repr.update(embedding):
                found.append(Detection("representation", self._repr_spec[0], self.seen))
        self.seen += 1
        self.detections += len(found)
        self.history.extend(found)
        return found

    def _update_error(self, error: bool) -> bool:
        before = getattr(self._error, "estimation", None)
        self._error.update(error)
        if not self._error.drift_detected:
            return False
        after = getattr(self._error, "estimation", None)
        return before is None or after is None or after > before


class LabelShiftDetector:
    """Watches the label distribution: how far the label shares of two adjacent windows lie apart.

    After each event, the total variation distance between the label shares of the last
    ``window`` events and of the ``window`` events before them (0: the same shares, 1: no label
    in common) goes to a river detector. New labels (a class-incremental stream) or a changed mix
    raise it for about two windows; a sentiment stream whose inputs stay alike but whose label
    shares change is seen here when its 0/1 error hardly moves. Both windows start empty again
    after a detection. Owned by the training thread.

    >>> det = LabelShiftDetector("PageHinkley", {"min_instances": 20, "delta": 0.15, "threshold": 2.0, "mode": "up"})
    >>> hits = [i for i, y in enumerate(["a", "b"] * 150 + ["c", "d"] * 50) if det.update(y)]
    >>> hits
    [311]
    """

    def __init__(self, detector: str, params: dict[str, Any], window: int = 20):
        if window < 1:
            raise ConfigError(f"drift.label_window must be at least 1, got {window}")
        self._spec = (detector, params)
        self._detector = make_detector(detector, params)
        self._window = window
        self._recent: deque[str] = deque(maxlen=2 * window)

    def update(self, label: str) -> bool:
        """Feed one event's label; whether a shift is detected here."""
        self._recent.append(label)
        if len(self._recent) < 2 * self._window:
            return False
        older, newer = Counter(list(self._recent)[: self._window]), Counter(list(self._recent)[self._window :])
        distance = sum(abs(older[k] - newer[k]) for k in older.keys() | newer.keys()) / (2 * self._window)
        self._detector.update(distance)
        if not self._detector.drift_detected:
            return False
        self._recent.clear()
        self._detector = make_detector(*self._spec)
        return True


class RepresentationShiftDetector:
    """Watches the inputs through the model's eyes: a random projection of each event's token embeddings.

    Each event arrives as the mean of its input token embeddings (the base model's lookup
    table, which training leaves alone: ``Trainer.step`` with ``capture_features``), so the
    figures move when the words do, never because the adapter learned. A fixed Gaussian
    projection (seeded, ``dims`` rows) keeps the cost independent of the model's width; the
    projections are scored in windows of ``window`` against every one since the last detection
    (``dynft.shift``). With 64 figures the score hardly wanders while the inputs stay alike,
    and moves of vocabulary spread over many of them (tweets after movie reviews, and back)
    stand out. Owned by the training thread.
    """

    def __init__(
        self, detector: str, params: dict[str, Any], width: int, dims: int = 64, window: int = 10, seed: int = 0
    ):
        import numpy as np

        if window < 2:
            raise ConfigError(f"drift.representation_window must be at least 2, got {window}")
        self._projection = np.random.default_rng(seed).standard_normal((dims, width)) / dims**0.5
        self._shift = WindowedShift(lambda: make_detector(detector, params), dims, window)

    def update(self, embedding: Any) -> bool:
        """Feed one event's mean token embedding (``width`` floats); whether a shift is detected here."""
        import numpy as np

        return self._shift.update(self._projection @ np.asarray(embedding, dtype=np.float64))


SAMPLE_CHARS = 1000  # of a text, for InputShiftDetector's character shares


class InputShiftDetector:
    """Watches the raw texts: a few surface statistics of each window of texts against those of
    all texts since the last detection.

    Each text gives seven figures that need no model (log length in characters and in words,
    the shares of upper-case letters, digits, punctuation and non-ASCII characters, the mean
    word length), scored in windows of ``window`` texts (``dynft.shift``): about 1 while the
    inputs stay alike, far above when a window holds texts of another kind (tweets after
    reviews). Owned by the training thread.

    >>> det = InputShiftDetector("PageHinkley", {"min_instances": 5, "delta": 2.0, "threshold": 40.0, "mode": "up"}, 10)
    >>> texts = [f"a calm review of film {i % 7}, quite long and fine." for i in range(300)]
    >>> texts += [f"@AIRLINE FLIGHT {i} DELAYED!!! #fail" for i in range(100)]
    >>> [i for i, t in enumerate(texts) if det.update(t)]
    [319]
    """

    FIGURES = 7

    def __init__(self, detector: str, params: dict[str, Any], window: int = 10):
        if window < 2:
            raise ConfigError(f"drift.input_window must be at least 2, got {window}")
        self._shift = WindowedShift(lambda: make_detector(detector, params), self.FIGURES, window)

    @staticmethod
    def figures(text: str) -> list[float]:
        """The surface statistics of one text (see the class docstring).

        The shares are read from the first ``SAMPLE_CHARS`` characters, with ``str`` methods mapped
        in C: the training thread pays this per event (8 us for a sentence, 135 us for 2,000 characters).
        """
        words = text.split()
        head = text[:SAMPLE_CHARS]
        n = max(len(head), 1)
        alnum, space = sum(map(str.isalnum, head)), sum(map(str.isspace, head))
        return [
            math.log1p(len(text)),
            math.log1p(len(words)),
            sum(map(str.isupper, head)) / n,
            sum(map(str.isdigit, head)) / n,
            (len(head) - alnum - space) / n,
            0.0 if head.isascii() else (len(head) - sum(map(str.isascii, head))) / n,
            sum(map(len, words)) / max(len(words), 1),
        ]

    def update(self, text: str) -> bool:
        """Feed one event's text; whether a shift is detected here (only at the end of a window)."""
        return self._shift.update(self.figures(text))
