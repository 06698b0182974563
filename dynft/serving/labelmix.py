"""How often each label arrived lately: the prior of the fast path's prototype rows.

Why: a prototype row (``dynft.serving.prototypes``) says how alike a text is to a label's first
events, not how common the label is. On a stream whose labels are not equally common (airline
tweets 60% negative, six emotions from 35% down to 4%, text messages 87% ham), version 0 and the
prototype rows of barely-known labels answered below the majority class for the first hundreds
of events: a rare label's row won as often as a common one's. Each prototype row now adds the log
of its label's recent rate, relative to the mean over the labels answered with, as a generative
classifier adds its class prior. Served over the first 400 events at 20/s
(``benchmarks/results/quality/README.md``, "2026-12-05, cold start on uneven label mixes"):
airline 66.5 -> 67.9%, emotion 43.8 -> 47.9%, SMS spam 87.3 -> 94.2%, banking's equally common
intents 79.3 -> 79.5%.

A label's rate is its share of the last ``WINDOW`` fresh events, counted over its own lifetime when
that is shorter (but at least ``MIN_LIFETIME``): a label that first came 30 events ago is judged on
those 30, so on a class-incremental stream a new label's first events give it a high rate (it is
what arrives now), not the low share of a window still full of older labels. ``SMOOTHING``
pseudo-events each way pull every rate towards one half, so a handful of events (the first seconds, or a balanced
stream's sampling noise) hardly move the prior. And while the window's counts are as even as equal
shares leave them by chance (``uneven``), there are no rates at all: inside a phase of equally
common intents the label counted least so far is the one a version barely knows, and a prior from
that noise held back the very prototype rows that had to answer it.

The trainer's batching thread counts (``LabelMix.add``, through ``ShotLog.offer``) and replaces
``<state_dir>/run/label-mix.json`` at most once every ``WRITE_EVERY_S`` (a temporary file renamed
over it: a reader sees the old file or the new one, never half of one). The server's watcher thread
reads it when it changed (``read_rates``) and hands the rates to the worker with the shots. The file
is advisory: missing, unreadable or of an older lineage, the rows get no prior, as before it existed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

MIX_FILE = Path("run") / "label-mix.json"  # under the state directory
WINDOW = 100  # fresh events the rates are read from
SMOOTHING = 5.0  # pseudo-events pulling each rate towards 1/2 (chosen offline: 0.5, 2 and 5 tried)
MIN_LIFETIME = 20  # events: a label's first one alone does not make it the commonest
WRITE_EVERY_S = 1.0
EVEN_P = 0.01  # below this chi-square p-value the window's label counts are uneven (``uneven``)


@dataclass(frozen=True)
class LabelRates:
    """The recent rate of each label of one lineage (see the module's docstring)."""

    lineage: int
    rates: dict[str, float]

    def prior(self, labels: Sequence[str], among: Sequence[str]) -> list[float]:
        """log(rate) of each of ``labels`` less the mean log rate over ``among`` (the labels answered
        with); 0 for a label without a rate."""
        logs = {label: math.log(self.rates[label]) for label in among if label in self.rates}
        if not logs:
            return [0.0] * len(labels)
        mean = sum(logs.values()) / len(logs)
        return [math.log(self.rates[label]) - mean if label in self.rates else 0.0 for label in labels]


class LabelMix:
    """The trainer's side: counts the default task's fresh labels and writes their rates for the server.

    >>> steady = LabelMix(Path("unused"))  # a label three times as common as the other
    >>> for label in ["a", "a", "a", "b"] * 25:
    ...     steady.add(label)
    >>> {k: round(v, 2) for k, v in steady.rates().items()}
    {'a': 0.73, 'b': 0.28}
    >>> incremental = LabelMix(Path("unused"))  # a new label takes over: it is what arrives now
    >>> for label in ["a"] * 80 + ["b"] * 20:
    ...     incremental.add(label)
    >>> {k: round(v, 2) for k, v in incremental.rates().items()}
    {'a': 0.77, 'b': 0.83}
    """

    def __init__(
        self,
        path: Path,
        lineage: int = 1,
        window: int = WINDOW,
        smoothing: float = SMOOTHING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.smoothing = smoothing  # > 0: every rate stays above 0 (its log is the prior)
        self.clock = clock
        self._recent: deque[str] = deque(maxlen=window)
        self._failing = False  # the last write failed (said once)
        self.reset(lineage)

    def add(self, label: str) -> None:
        self._first.setdefault(label, self._seen)
        self._seen += 1
        self._recent.append(label)
        self._changed = True

    def reset(self, lineage: int) -> None:
        """A new lineage (a drift reaction reset the head or the adapter): count afresh."""
        self.lineage = lineage
        self._recent.clear()
        self._first: dict[str, int] = {}  # label -> how many events had come before its first
        self._seen = 0
        self._written_at: float | None = None
        self._changed = False  # events counted since the last write

    def rates(self) -> dict[str, float]:
        """Each label's rate; none at all while the window's labels are as even as sampling noise
        leaves equal shares (see ``uneven``)."""
        counts, recent, a = Counter(self._recent), len(self._recent), self.smoothing
        if not uneven(list(counts.values())):
            return {}
        # Over the window, or over the label's own lifetime when that is shorter.
        lifetimes = {label: min(recent, max(self._seen - first, MIN_LIFETIME)) for label, first in self._first.items()}
        return {label: (counts[label] + a) / (events + 2 * a) for label, events in lifetimes.items()}

    def write(self) -> None:
        """Replace the file with the rates now, unless it was written less than ``WRITE_EVERY_S`` ago.

        Advisory, like the shots: a write the disk refuses is logged (once, until one succeeds again:
        a full disk would otherwise say so every second) and tried again at the next call: with the
        next events, or while none come (``ShotLog.idle``), so a stream gone quiet is not left with
        the rates of a second before its last events.
        """
        now = self.clock()
        if not self._changed or (self._written_at is not None and now - self._written_at < WRITE_EVERY_S):
            return
        self._written_at, self._changed = now, False
        body = json.dumps({"lineage": self.lineage, "rates": self.rates()})
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            temporary.write_text(body, encoding="utf-8")
            os.replace(temporary, self.path)  # no fsync: a lost mix only delays the prior
        except OSError as exc:
            if not self._failing:
                log.warning("cannot hand the label mix to the server's fast path (%s): %s", self.path, exc)
            self._failing = self._changed = True  # tried again at the next write
        else:
            if self._failing:
                log.info("the label mix reaches the server's fast path again (%s)", self.path)
            self._failing = False


def uneven(counts: list[int], level: float = EVEN_P) -> bool:
    """Whether ``counts`` (events of each label in the window) are too uneven for labels of equal
    shares: Pearson's chi-square test, p below ``level``.

    Why: on a stream of equally common labels (a class-incremental phase of intents) the window's
    counts still differ by sampling, and a label counted less so far is the one a version barely
    knows, whose prototype row then stood in for it: a prior from those counts held back exactly
    the rows that had to answer (measured: banking's first 400 events about 3 points below no prior).

    >>> uneven([60, 20, 20]), uneven([12, 9, 8, 11, 10]), uneven([5])
    (True, False, False)
    """
    total = sum(counts)
    if len(counts) < 2 or total <= 0:
        return False
    # Pearson's statistic is rough where expected counts are one or two (77 intents in 100 events);
    # on the banking stream it left its equally common intents without a prior, as meant.
    expected = total / len(counts)
    statistic = sum((count - expected) ** 2 for count in counts) / expected
    freedom = torch.tensor((len(counts) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(freedom, torch.tensor(statistic / 2, dtype=torch.float64))) < level


def read_rates(path: Path) -> LabelRates | None:
    """The rates in ``path``; None when it is missing or malformed (said in the log)."""
    try:
        row: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring an unreadable label mix %s: %s", path, exc)
        return None
    rates = row.get("rates") if isinstance(row, dict) else None
    lineage = row.get("lineage") if isinstance(row, dict) else None
    if (
        not isinstance(rates, dict)
        or not isinstance(lineage, int)
        or isinstance(lineage, bool)
        or not all(_is_rate(value) for value in rates.values())
    ):
        log.warning("ignoring a malformed label mix %s", path)
        return None
    return LabelRates(lineage, {str(label): float(value) for label, value in rates.items()})


def _is_rate(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1 and math.isfinite(value)
