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
from collections import deque
from collections.abc import Callable, Sequence

from dynft.batching import Collator, LabelMap
from dynft.errors import AdapterMismatchError, RegistryError
from dynft.events import Event
from dynft.model import AdapterState, build_model, peft_config_from_dict
from dynft.settings import Settings
from dynft.trainer import OnlineTrainer

log = logging.getLogger(__name__)


class Scores:
    """One check's result: both accuracies on the same events, and the candidate's answers."""

    def __init__(
        self, events: list[Event], candidate: dict[str, str], reference: dict[str, str], full: bool, scope: str = ""
    ) -> None:
        self.events = len(events)
        self.candidate = accuracy(events, candidate)
        self.reference = accuracy(events, reference)
        self.full = full
        self.answers = candidate  # the candidate's, by event id
        # The events judged: the whole held-out window, its newest, or those trained since the
        # serving version was cut (``SinceServing``).
        self.scope = scope or ("window" if full else "newest")


Predict = Callable[[list[Event], AdapterState], list[str]]  # a version's answers to events


class VersionAnswers:
    """One version's answers by event id, each event run through it once; its weights are loaded
    at the first event it has to answer and then kept (pruning cannot take them)."""

    def __init__(self, version: int | None = None, state: AdapterState | None = None) -> None:
        self.version, self.state = version, state
        self.by_id: dict[str, str] = {}

    def of(self, events: list[Event], load: Callable[[int], AdapterState], predict: Predict) -> dict[str, str]:
        """Its answers, with those to ``events`` among them (computed for the events not seen yet)."""
        todo = [e for e in events if e.id not in self.by_id]
        if todo and self.version is not None:
            if self.state is None:
                self.state = load(self.version)
            self.by_id.update(zip((e.id for e in todo), predict(todo, self.state), strict=True))
        return self.by_id

    def keep_only(self, events: list[Event]) -> None:
        """Forget events that left ``events`` (once the cache holds twice as many)."""
        if len(self.by_id) > 2 * len(events):
            keep = {e.id for e in events}
            self.by_id = {k: v for k, v in self.by_id.items() if k in keep}


class Scorer:
    """The reference version, its cached answers, and when the next full check is due."""

    def __init__(self, trainer: OnlineTrainer, settings: Settings, clock: Callable[[], int]) -> None:
        self.trainer = trainer
        self.settings = settings
        self.clock = clock  # the publishing schedule's steps (see Publisher.clock)
        self._answers = VersionAnswers()  # the reference's (exact)
        self._full_at = (0, time.monotonic())  # (steps, monotonic seconds) of the last full check

    @property
    def reference(self) -> int | None:
        return self._answers.version

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
        reference = self._answers.of(events, load, self._predict)
        self._answers.keep_only(window)
        return Scores(events, candidate, reference, full)

    def reset(self, version: int | None) -> None:
        """Make ``version`` the reference (its answers are computed as checks need them); the next check is full."""
        if version != self.reference:
            log.info("gate reference: version %s", version)
        self._answers = VersionAnswers(version)
        self._full_at = (self.clock() - self.settings.registry.publish_every_steps, time.monotonic())

    def promoted(self, version: int, state: AdapterState, scores: Scores | None) -> None:
        """``version`` now serves; after a full check it becomes the reference (its answers are known)."""
        if scores is not None and scores.full:
            self._answers = VersionAnswers(version, state)
            self._answers.by_id = dict(scores.answers)

    def follows(self, serving: int | None, ours: int | None) -> None:
        """Reset the reference when the serving version is neither it nor the last one this trainer promoted."""
        if serving is not None and serving not in (self.reference, ours):
            self.reset(serving)

    def _predict(self, events: list[Event], state: AdapterState) -> list[str]:
        try:
            return self.trainer.predictions(events, state)
        except AdapterMismatchError:
            # Trained with another adapter configuration: score it with a model of its own
            # shape (slow, but only until a version of the current configuration serves).
            return self._foreign_predictions(state, events)

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
        collator = Collator(
            tokenizer, trainer.collator.max_length, LabelMap(), pad_multiple=trainer.collator.pad_multiple
        )
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


class SinceServing:
    """Fresh events trained since the serving version was cut, each with the trainer's answer to it,
    made before the step that learned it (test then train).

    While too few events are held out to judge (``gate.min_holdout``: at a 10% share that is the
    first 16 s of a stream fed at 20 events/s, and over 5 minutes at 1 event/s), the gate compares
    on these instead: the trainer's answers with the serving version's on the same events. Both are
    out of sample (the serving version was cut before the events arrived, and each answer of the
    trainer came before it learned the event), and the candidate has learned more than the weights
    that gave those answers, so the comparison can only favour the serving version. Each event is
    run through the serving version once. Training thread only.
    """

    def __init__(self, capacity: int) -> None:
        self._events: deque[tuple[Event, str | None]] = deque(maxlen=capacity)
        self._serving = VersionAnswers()

    def __len__(self) -> int:
        return len(self._events)

    def add(self, events: Sequence[Event], predictions: Sequence[str | None]) -> None:
        self._events.extend(zip(events, predictions, strict=True))

    def clear(self) -> None:
        """A new version serves (or a new lineage starts): what came before is in its sample."""
        self._events.clear()
        self._serving.by_id = {}

    def check(self, trainer: OnlineTrainer, serving: int, load: Callable[[int], AdapterState]) -> Scores:
        """The trainer's answers against ``serving``'s on the events (the candidate's answers: the trainer's)."""
        if serving != self._serving.version:
            self._serving = VersionAnswers(serving)
        pairs = list(self._events)
        events = [event for event, _ in pairs]
        answers = self._serving.of(events, load, trainer.predictions)
        self._serving.keep_only(events)
        trained = {event.id: answer for event, answer in pairs if answer is not None}
        return Scores(events, trained, answers, full=False, scope="prequential")


def accuracy(events: list[Event], predictions: dict[str, str]) -> float:
    return sum(predictions.get(e.id) == e.label for e in events) / max(1, len(events))
