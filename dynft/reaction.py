"""What the trainer does about drift: the reactions to the detectors' findings, and lineages.

``DriftReaction`` turns detections (``dynft.drift.Detection``) into changes of the trainer and
the replay buffer it is given, and says in a ``Response`` what it did; the caller (the training
loop) counts them and starts a new lineage in the publisher when told to.

- ``boost``: a higher learning rate, and extra replay steps, for ``boost_steps`` steps;
- ``upweight``: a share of replay drawn from the events since the detection;
- ``new_lineage``: a fresh adapter and an empty replay buffer at once;
- ``retire``: on a *confirmed concept change* only, the replay of events from before the
  detection is retired and the classification head starts afresh (the adapter is kept). A
  detection on the error or loss stream opens a check over the next ``2 * concept_confirm_events``
  events: it is a concept change (the same inputs now have other labels) when the error on
  labels known before the detection, over ``concept_confirm_events`` of them in a row, rose by
  ``concept_error_rise`` or more over the error before it, and none of the label, input and
  representation detectors fired around it (new labels or new inputs explain errors without a
  change of concept; their events are worth replaying). Replaying the old concept would fight the new one.

Every reset (``new_lineage``, ``retire``) starts a new *lineage*: work made before it (batches
tokenized with replay from the old buffer, held-out events of the old concept) carries the old
number and is dropped by the loop. Owned by the training thread; the batching thread only reads
``lineage`` and ``replay_plan()`` (a tuple read as one object, so it is never half-updated).
Testable without threads or a model:

>>> from dynft.settings import DriftSettings
>>> class Trainer:
...     steps, lr_scale = 0, 1.0
...     def reset_adapter(self) -> None: ...
...     def anchor_to(self, state: object) -> None: ...
...     def reset_head(self) -> None: ...
>>> class Buffer:
...     seen = 500
...     def clear(self) -> None: ...
...     def retire_before(self, seq: int) -> int: return seq
>>> settings = DriftSettings(reactions=["boost", "retire"], concept_confirm_events=3)
>>> reaction = DriftReaction(settings, Trainer(), Buffer())
>>> for i in range(100):
...     _ = reaction.observe(i, "a", "a" if i % 4 else "b")  # 25% errors before
>>> reaction.on_detection(Detection("error", "ADWIN", 100)).applied
['boost']
>>> [reaction.observe(100 + i, "a", "c").retired for i in range(3)]  # all wrong after: confirmed
[0, 0, 500]
>>> reaction.lineage
2
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from dynft.drift import Detection
from dynft.settings import DriftSettings

log = logging.getLogger(__name__)

PERFORMANCE = ("error", "loss")  # streams whose detections may be concept changes
PRE_WINDOW = 200  # events whose error is the reference a concept change rises from


class Trainable(Protocol):
    steps: int
    lr_scale: float

    def reset_adapter(self) -> None: ...

    def anchor_to(self, state: Any) -> None: ...

    def reset_head(self) -> None: ...


class Replay(Protocol):
    @property
    def seen(self) -> int: ...

    def clear(self) -> None: ...

    def retire_before(self, seq: int) -> int: ...


@dataclass
class Response:
    """What one call did: reactions applied, events retired from replay, whether a lineage began."""

    applied: list[str] = field(default_factory=list)
    retired: int = 0
    new_lineage: bool = False


@dataclass
class _Check:
    """A performance detection waiting to be confirmed as a concept change."""

    index: int  # prequential index of the detection
    since: int  # buffer sequence number at the detection: replay before it is the old concept's
    pre_error: float  # error rate before the detection
    known: frozenset[str]  # labels seen before the detection
    events: int = 0  # events of known labels since the detection
    recent: list[bool] = field(default_factory=list)  # the newest concept_confirm_events of them: wrong?
    peak: float = 0.0  # the highest error over concept_confirm_events of them so far


class DriftReaction:
    """Reacts to detections and confirms concept changes; see the module docstring."""

    def __init__(self, settings: DriftSettings, trainer: Trainable, buffer: Replay):
        self.settings = settings
        self.trainer = trainer
        self.buffer = buffer
        self.lineage = 1
        self.boost_until = -1  # trainer step at which the current reaction ends (-1: none)
        self.recent_since: int | None = None  # buffer sequence number replay is upweighted from
        self.last = -(10**9)  # prequential index of the last reaction (cooldown)
        self._errors: deque[bool] = deque(maxlen=PRE_WINDOW)
        self._labels: set[str] = set()
        self._shifts: deque[int] = deque(maxlen=16)  # indices of label / input / representation detections
        self._check: _Check | None = None
        self._retired_at = -(10**9)  # prequential index of the last retire

    # -- what the batching thread reads --------------------------------------------------

    def replay_plan(self) -> tuple[int | None, float]:
        """(sequence number to upweight from, share of replay drawn from there)."""
        since = self.recent_since
        return since, self.settings.upweight_share if since is not None else 0.0

    @property
    def boosting(self) -> bool:
        return self.trainer.steps < self.boost_until

    # -- what the training thread calls --------------------------------------------------

    def observe(self, index: int, label: str, prediction: str | None) -> Response:
        """One prequential event (after the detectors saw it); may confirm a pending concept change."""
        wrong = prediction != label
        check = self._check
        if check is not None and label in check.known:
            span = self.settings.concept_confirm_events
            check.events += 1
            check.recent = [*check.recent[-(span - 1) :], wrong] if span > 1 else [wrong]
            if len(check.recent) == span:
                if self._confirmed(check):
                    self._check = None
                    return self._retire(check, index)
                if check.events >= 2 * span:
                    self._check = None
                    self._not_confirmed(check)
        self._errors.append(wrong)
        self._labels.add(label)
        return Response()

    def on_detection(self, detection: Detection) -> Response:
        """React to one detection (within the cooldown, only label/input/representation ones are noted)."""
        d = self.settings
        # No concept check within a cooldown of a retire: the fresh head's own early errors would
        # confirm a second change and throw it away again.
        settled = detection.index - self._retired_at >= d.cooldown_events
        if detection.stream not in PERFORMANCE:
            self._shifts.append(detection.index)
        elif "retire" in d.reactions and self._check is None and settled:
            pre = sum(self._errors) / len(self._errors) if self._errors else 0.0
            self._check = _Check(detection.index, self.buffer.seen, pre, frozenset(self._labels))
        if detection.index - self.last < d.cooldown_events:
            return Response()
        self.last = detection.index
        response = Response()
        for reaction in d.reactions:
            if reaction == "boost":
                self.trainer.lr_scale = d.boost_lr_factor
            elif reaction == "upweight":
                self.recent_since = self.buffer.seen
            elif reaction == "new_lineage":
                if detection.stream not in PERFORMANCE:
                    # A new label mix or new inputs say nothing against what was learned: throwing a
                    # working adapter away on them made a stable stream reset again and again.
                    continue
                # A fresh adapter that learns the new concept from events after the drift only:
                # replaying the old concept would contradict it. Old lineages stay in the registry.
                self.trainer.reset_adapter()
                self.buffer.clear()
                self._begin_lineage(response)
            elif reaction == "retire":
                continue  # applied when a check confirms a concept change (observe)
            response.applied.append(reaction)
        self.boost_until = self.trainer.steps + d.boost_steps
        return response

    def after_step(self) -> bool:
        """Called after each fresh step; whether a reaction just ended."""
        if self.boost_until < 0 or self.boosting:
            return False
        self.trainer.lr_scale, self.boost_until, self.recent_since = 1.0, -1, None
        return True

    def _shifted(self, check: _Check) -> bool:
        around = self.settings.concept_confirm_events
        return any(abs(i - check.index) <= around for i in self._shifts)

    def _confirmed(self, check: _Check) -> bool:
        """Whether the error over the newest ``concept_confirm_events`` events rose enough.

        A window that slides over twice as many events, not the first ones only: a loss detector
        may fire a few events before the change (the quick concept stream's at 230 of 240), and
        the events before it kept the first window's error under the bar (0.60 against 0.32).
        """
        check.peak = max(check.peak, sum(check.recent) / len(check.recent))
        rise = check.peak - check.pre_error
        return rise >= self.settings.concept_error_rise and not self._shifted(check)

    def _not_confirmed(self, check: _Check) -> None:
        """Said, so that an operator can tell a missed concept change from none."""
        why = "a label, input or representation shift was detected around it" if self._shifted(check) else "too small"
        log.info(
            "no concept change at event %d: error on known labels at most %.2f over %d events after it, "
            "%.2f before (%s)",
            check.index,
            check.peak,
            self.settings.concept_confirm_events,
            check.pre_error,
            why,
        )

    def _retire(self, check: _Check, index: int) -> Response:
        response = Response(applied=["retire"], retired=self.buffer.retire_before(check.since))
        self.last = self._retired_at = index  # the cooldown starts again from the reset
        self._begin_lineage(response)
        self.trainer.anchor_to(None)  # a pull toward the serving version would pull toward the old concept
        self.trainer.reset_head()  # the old head answers the old concept; the features still hold
        # The new concept is learned from what came after the detection, boosted afresh.
        self.recent_since = check.since
        if "boost" in self.settings.reactions:
            self.trainer.lr_scale = self.settings.boost_lr_factor
        self.boost_until = self.trainer.steps + self.settings.boost_steps
        self._errors.clear()
        return response

    def _begin_lineage(self, response: Response) -> None:
        self.lineage += 1
        response.new_lineage = True

    # -- checkpoints ---------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        check = self._check
        return {
            "boost_until": self.boost_until,
            "recent_since": self.recent_since,
            "last": self.last,
            "retired_at": self._retired_at,
            "lineage": self.lineage,
            "errors": [int(e) for e in self._errors],
            "labels": sorted(self._labels),
            "shifts": list(self._shifts),
            "check": None if check is None else {**vars(check), "known": sorted(check.known)},
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a ``snapshot`` (older checkpoints hold only the first three keys)."""
        self.boost_until, self.recent_since, self.last = state["boost_until"], state["recent_since"], state["last"]
        self.lineage = int(state.get("lineage", 1))
        self._retired_at = int(state.get("retired_at", -(10**9)))
        self._errors = deque((bool(e) for e in state.get("errors", [])), maxlen=PRE_WINDOW)
        self._labels = set(state.get("labels", []))
        self._shifts = deque(state.get("shifts", []), maxlen=16)
        check = state.get("check")
        if check is not None:  # a check from before the sliding window (it counted "errors") starts it afresh
            check = {k: v for k, v in check.items() if k != "errors"}
            check = {**check, "known": frozenset(check["known"]), "recent": [bool(e) for e in check.get("recent", [])]}
        self._check = None if check is None else _Check(**check)
