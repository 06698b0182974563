"""What the promotion gate compares: a candidate's and a reference version's answers on held-out events.

Scoring a candidate on the whole held-out window costs one forward pass per event, about half a
training step per 8 events: at every publish it took a quarter of the trainer's time, and so
versions could only be cut every 20 s. Two kinds of check share that cost out:

- **full**: the candidate on the whole window. Due every ``registry.publish_every_steps`` steps
  or ``registry.publish_interval_s`` seconds, and whenever the reference changes hands.
- **quick**: between full checks, the candidate on the newest ``gate.quick_events`` held-out
  events only: cheap enough to publish right after the step that trained new events
  (``registry.publish_fresh``), which is what makes versions fresh.

Both compare the candidate with the same *reference*: the last version this trainer promoted
after a full check, or the serving version when there is none (at start, after an operator's
promotion or rollback). Not the serving version itself: a quick check sees few events, and
comparing each quick candidate with the previous quick one would let small losses add up. With a
fixed reference, every version that serves is at most ``gate.tolerance`` below one that passed
the whole window.

The reference's answers are exact and cached: each held-out event is run through it once, the
first time a check needs it, and after a full check that promotes, the candidate's own answers on
the window become the new reference's. Used on the training thread only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from dynft.batching import Collator, LabelMap
from dynft.errors import AdapterMismatchError, RegistryError
from dynft.events import Event
from dynft.model import AdapterState, build_model, peft_config_from_dict
from dynft.settings import Settings
from dynft.trainer import OnlineTrainer

log = logging.getLogger(__name__)


class Scores:
    """One check's result: both accuracies on the same events, and the candidate's answers."""

    def __init__(self, events: list[Event], candidate: dict[str, str], reference: dict[str, str], full: bool) -> None:
        self.events = len(events)
        self.candidate = accuracy(events, candidate)
        self.reference = accuracy(events, reference)
        self.full = full
        self.answers = candidate  # the candidate's, by event id

    @property
    def scope(self) -> str:
        return "window" if self.full else "newest"


class Scorer:
    """The reference version, its cached answers, and when the next full check is due."""

    def __init__(self, trainer: OnlineTrainer, settings: Settings, clock: Callable[[], int]) -> None:
        self.trainer = trainer
        self.settings = settings
        self.clock = clock  # the publishing schedule's steps (see Publisher.clock)
        self.reference: int | None = None
        self._state: AdapterState | None = None  # the reference's weights, if in memory (pruning cannot take them)
        self._answers: dict[str, str] = {}  # the reference's answers by event id (exact)
        self._full_at = (0, time.monotonic())  # (steps, monotonic seconds) of the last full check

    def full_due(self) -> bool:
        r, quick = self.settings.registry, self.settings.gate.quick_events
        steps, at = self._full_at
        moved = self.clock() - steps
        return not quick or moved >= r.publish_every_steps or time.monotonic() - at >= r.publish_interval_s

    def check(self, window: list[Event], serving: int, load: Callable[[int], AdapterState]) -> Scores:
        """Score the live adapter against the reference (reset to ``serving`` when the serving
        pointer moved to a version this trainer did not promote) on the window or its newest events."""
        if self.reference is None:
            self.reset(serving)
        quick = self.settings.gate.quick_events
        full = self.full_due() or len(window) <= quick
        events = window if full else window[-quick:]
        if full:
            self._full_at = (self.clock(), time.monotonic())
        candidate = dict(zip((e.id for e in events), self.trainer.predictions(events), strict=True))
        reference = self._reference_answers(events, load)
        if len(self._answers) > 2 * len(window):  # forget events that left the window
            keep = {e.id for e in window}
            self._answers = {k: v for k, v in self._answers.items() if k in keep}
        return Scores(events, candidate, reference, full)

    def reset(self, version: int | None) -> None:
        """Make ``version`` the reference (its answers are computed as checks need them); the next check is full."""
        if version != self.reference:
            log.info("gate reference: version %s", version)
        self.reference, self._state, self._answers = version, None, {}
        self._full_at = (self.clock() - self.settings.registry.publish_every_steps, time.monotonic())

    def promoted(self, version: int, state: AdapterState, scores: Scores | None) -> None:
        """``version`` now serves; after a full check it becomes the reference (its answers are known)."""
        if scores is not None and scores.full:
            self.reference, self._state, self._answers = version, state, dict(scores.answers)

    def follows(self, serving: int | None, ours: int | None) -> None:
        """Reset the reference when the serving version is neither it nor the last one this trainer promoted."""
        if serving is not None and serving not in (self.reference, ours):
            self.reset(serving)

    def _reference_answers(self, events: list[Event], load: Callable[[int], AdapterState]) -> dict[str, str]:
        todo = [e for e in events if e.id not in self._answers]
        if todo and self.reference is not None:
            if self._state is None:
                self._state = load(self.reference)
            try:
                predicted = self.trainer.predictions(todo, self._state)
            except AdapterMismatchError:
                # Trained with another adapter configuration: score it with a model of its own
                # shape (slow, but only until a version of the current configuration serves).
                predicted = self._foreign_predictions(self._state, todo)
            self._answers.update(zip((e.id for e in todo), predicted, strict=True))
        return self._answers

    def _foreign_predictions(self, state: AdapterState, events: list[Event]) -> list[str]:
        trainer = self.trainer
        if trainer.base_model_path is None:
            raise RegistryError("cannot score the reference version: base model path unknown")
        config = peft_config_from_dict(state.peft_config)
        tokenizer = trainer.collator.tokenizer
        model = build_model(
            trainer.base_model_path,
            config,
            len(state.labels),
            trainer.device,
            tokenizer.pad_token_id,
            trainer.pooling,
            self.settings.model,
        )
        collator = Collator(tokenizer, trainer.collator.max_length, LabelMap())
        other = OnlineTrainer(
            model,
            collator,
            self.settings.trainer,
            trainer.device,
            pooling=trainer.pooling,
            compute_dtype=trainer.compute_dtype,
        )
        other.load(state)
        return other.predictions(events)


def accuracy(events: list[Event], predictions: dict[str, str]) -> float:
    return sum(predictions.get(e.id) == e.label for e in events) / max(1, len(events))
