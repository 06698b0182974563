"""How far each window of rows lies from every row before it: the core of the input detectors.

Both detectors on what arrives (``dynft.drift``: ``InputShiftDetector`` on surface statistics
of the texts, ``RepresentationShiftDetector`` on a projection of their token embeddings) turn
each event into a row of figures and hand it to a ``WindowedShift``. Rows are taken in windows
of ``window`` (one after the other, so that their scores are independent); a window's score is
the mean over the figures of the squared z-score of its mean against the reference (every row
since the last detection: its mean and variance, kept by Welford's method), each capped at
``CAP``. While the rows come from one distribution each squared z-score is about 1 on average,
so the score stays near 1 whatever the figures' scales; a window of another kind lies far
above. The scores go to a river detector (its ``min_instances`` counts windows), and the window
joins the reference; after a detection the reference and the detector start afresh. The more
figures, the less the score wanders around 1 (their mean), so a small shift spread over many
figures stands out. Owned by the training thread.

>>> from river.drift import PageHinkley
>>> shift = WindowedShift(lambda: PageHinkley(min_instances=5, delta=0.5, threshold=5.0, mode="up"), 2, 10)
>>> rows = [[i % 3, i % 5] for i in range(300)] + [[i % 3 + 2, i % 5] for i in range(100)]
>>> [i for i, row in enumerate(rows) if shift.update(row)]
[309]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


class WindowedShift:
    """Scores windows of ``width`` figures against the rows before them (see the module's docstring)."""

    CAP = 100.0  # one odd figure (a window of texts full of digits) cannot outweigh the others

    def __init__(self, make_detector: Callable[[], Any], width: int, window: int):
        self._make = make_detector
        self._width = width
        self._window = window
        self.reset()

    def reset(self) -> None:
        self._detector = self._make()
        self._rows: list[Sequence[float]] = []  # the window being filled
        self._seen = 0  # rows in the reference, with their running mean and squared deviations (Welford)
        self._mean = np.zeros(self._width)
        self._squares = np.zeros(self._width)

    def update(self, row: Sequence[float]) -> bool:
        """Feed one event's figures; whether a shift is detected here (only at the end of a window)."""
        self._rows.append(row)
        if len(self._rows) < self._window:
            return False
        rows, self._rows = np.asarray(self._rows, dtype=np.float64), []
        if self._seen >= 2 * self._window:
            self._detector.update(self.score(rows))
            if self._detector.drift_detected:
                self.reset()
                return True
        for x in rows:  # the window joins the reference
            self._seen += 1
            delta = x - self._mean
            self._mean += delta / self._seen
            self._squares += delta * (x - self._mean)
        return False

    def score(self, rows: np.ndarray) -> float:
        """The mean over the figures of the capped squared z-score of ``rows``' mean (R, width)."""
        variance = self._squares / (self._seen - 1)
        known = variance > 1e-12  # a figure constant so far (no digits ever) says nothing yet
        gap = rows.mean(axis=0) - self._mean
        z2 = np.where(known, gap * gap / np.where(known, variance / len(rows), 1.0), 0.0)
        return float(np.minimum(z2, self.CAP).sum() / self._width)
