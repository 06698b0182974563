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
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from river import drift
from river.base import BinaryDriftDetector, DriftDetector

from dynft.errors import ConfigError


class Detector(Protocol):
    """What dynft uses of a river detector."""

    drift_detected: bool

    def update(self, x: Any) -> Any: ...


@dataclass(frozen=True)
class Detection:
    stream: str  # "error" or "loss"
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
    ):
        self.error_name, self.loss_name = error_detector, loss_detector
        self._specs = (error_detector, error_params, loss_detector, loss_params)
        self._error = make_detector(error_detector, error_params)
        self._loss = make_detector(loss_detector, loss_params)
        self._recent: deque[tuple[bool, float]] = deque(maxlen=keep)  # to rebuild detectors after a restart
        if isinstance(self._loss, BinaryDriftDetector):
            raise ConfigError(f"drift.loss_detector {loss_detector} only takes 0/1 input; the loss is continuous")
        self.seen = 0
        self.detections = 0
        self.history: deque[Detection] = deque(maxlen=100)  # the most recent detections

    def snapshot(self) -> dict[str, Any]:
        return {"seen": self.seen, "detections": self.detections, "recent": list(self._recent)}

    def restore(self, state: dict[str, Any]) -> None:
        """Warm fresh detectors on the recent streams (river detectors have no pickle-free state)."""
        error_name, error_params, loss_name, loss_params = self._specs
        self._error = make_detector(error_name, error_params)
        self._loss = make_detector(loss_name, loss_params)
        for error, loss in state["recent"]:
            self._update_error(error)
            self._loss.update(loss)
            self._recent.append((error, loss))
        self.seen, self.detections = state["seen"], state["detections"]

    def update(self, error: bool, loss: float) -> list[Detection]:
        self._recent.append((error, loss))
        found = []
        if self._update_error(error):
            found.append(Detection("error", self.error_name, self.seen))
        self._loss.update(loss)
        if self._loss.drift_detected:
            found.append(Detection("loss", self.loss_name, self.seen))
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
