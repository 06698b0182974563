"""The drift reaction class (dynft.reaction), driven with detections and events, without threads or a model.

The trainer and buffer it acts on are small recording fakes of the two protocols it uses
(``Trainable``, ``Replay``); the replay buffer's own ``retire_before`` is tested on the real one.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from dynft.buffer import ReplayBuffer
from dynft.drift import Detection
from dynft.events import Event
from dynft.reaction import DriftReaction
from dynft.settings import DriftSettings


class Trainer:
    def __init__(self) -> None:
        self.steps = 0
        self.lr_scale = 1.0
        self.resets = 0
        self.anchors: list[Any] = []
        self.head_resets = 0

    def reset_adapter(self) -> None:
        self.resets += 1

    def anchor_to(self, state: Any) -> None:
        self.anchors.append(state)

    def reset_head(self) -> None:
        self.head_resets += 1


class Buffer:
    def __init__(self) -> None:
        self.seen = 0
        self.cleared = 0
        self.retired: list[int] = []

    def clear(self) -> None:
        self.cleared += 1

    def retire_before(self, seq: int) -> int:
        self.retired.append(seq)
        return seq


def make(reactions: list[str], **changes: Any) -> tuple[DriftReaction, Trainer, Buffer]:
    settings = DriftSettings(
        reactions=reactions, boost_steps=10, cooldown_events=50, concept_confirm_events=20, **changes
    )  # type: ignore[arg-type]
    trainer, buffer = Trainer(), Buffer()
    return DriftReaction(settings, trainer, buffer), trainer, buffer


def feed(reaction: DriftReaction, buffer: Buffer, start: int, pairs: list[tuple[str, str]]) -> list[int]:
    """Events (label, prediction) from prequential index ``start``; returns the indices where replay was retired."""
    retired = []
    for i, (label, prediction) in enumerate(pairs, start):
        buffer.seen += 1
        if reaction.observe(i, label, prediction).retired:
            retired.append(i)
    return retired


LABELS = ["a", "b", "c", "d"]


def learned(n: int, wrong_every: int = 5) -> list[tuple[str, str]]:
    """A model that is right on 4 events out of 5 (20% error)."""
    out = []
    for i in range(n):
        label = LABELS[i % 4]
        out.append((label, LABELS[(i + 1) % 4] if i % wrong_every == 0 else label))
    return out


def permuted(n: int) -> list[tuple[str, str]]:
    """The same inputs with new labels: the model still answers the old concept, so it is wrong on every one."""
    return [(LABELS[(i + 1) % 4], LABELS[i % 4]) for i in range(n)]


def test_boost_and_upweight_last_boost_steps_steps_then_end() -> None:
    reaction, trainer, buffer = make(["boost", "upweight"])
    buffer.seen = 123
    response = reaction.on_detection(Detection("error", "ADWIN", 400))
    assert response.applied == ["boost", "upweight"] and not response.new_lineage
    assert trainer.lr_scale == 3.0 and reaction.replay_plan() == (123, 0.5)
    trainer.steps = 9
    assert reaction.boosting and not reaction.after_step()
    trainer.steps = 10
    assert not reaction.boosting and reaction.after_step()
    assert trainer.lr_scale == 1.0 and reaction.replay_plan() == (None, 0.0)
    assert not reaction.after_step()  # nothing left to end


def test_detections_within_the_cooldown_change_nothing() -> None:
    reaction, _trainer, buffer = make(["boost", "upweight"])
    assert reaction.on_detection(Detection("loss", "PageHinkley", 100)).applied == ["boost", "upweight"]
    buffer.seen = 77
    assert reaction.on_detection(Detection("label", "PageHinkley", 149)).applied == []
    assert reaction.replay_plan() == (0, 0.5)  # still the first reaction's
    assert reaction.on_detection(Detection("representation", "PageHinkley", 150)).applied == ["boost", "upweight"]
    assert reaction.replay_plan() == (77, 0.5)


def test_new_lineage_resets_the_adapter_and_the_buffer_at_once() -> None:
    reaction, trainer, buffer = make(["boost", "new_lineage"])
    response = reaction.on_detection(Detection("error", "ADWIN", 300))
    assert response.new_lineage and response.applied == ["boost", "new_lineage"]
    assert (trainer.resets, buffer.cleared, reaction.lineage) == (1, 1, 2)


def test_a_confirmed_concept_change_retires_replay_from_before_the_detection() -> None:
    reaction, trainer, buffer = make(["boost", "upweight", "retire"])
    feed(reaction, buffer, 0, learned(300))
    response = reaction.on_detection(Detection("error", "ADWIN", 300))
    assert response.applied == ["boost", "upweight"]  # retire waits for the confirmation
    assert buffer.seen == 300
    trainer.lr_scale = 1.0
    trainer.steps = 50  # the first reaction is over by the time the check ends
    retired = feed(reaction, buffer, 300, permuted(40))
    assert retired == [319]  # the 20th event after the detection confirms it
    assert buffer.retired == [300]  # events from before the detection go
    assert reaction.lineage == 2 and trainer.anchors == [None] and trainer.head_resets == 1 and trainer.resets == 0
    assert trainer.lr_scale == 3.0 and reaction.boosting and reaction.replay_plan() == (300, 0.5)


def test_a_detection_a_little_before_the_change_is_confirmed_once_the_change_fills_the_window() -> None:
    """A loss detector may fire a few events early: 15 events of the old concept first."""
    reaction, _trainer, buffer = make(["boost", "upweight", "retire"])
    feed(reaction, buffer, 0, learned(300))
    reaction.on_detection(Detection("loss", "PageHinkley", 300))
    # The first 20 (300-319) have 8 errors (0.40 against 0.20 before: under the bar of 0.3); the
    # 20 up to 322 have 10 (0.50): confirmed there.
    assert feed(reaction, buffer, 300, learned(15) + permuted(40)) == [322]
    assert buffer.retired == [300]


def test_a_check_gives_up_after_twice_its_window() -> None:
    reaction, _trainer, buffer = make(["retire"])
    feed(reaction, buffer, 0, learned(300))
    reaction.on_detection(Detection("error", "ADWIN", 300))
    assert feed(reaction, buffer, 300, learned(40)) == []  # no rise: the check ends at the 40th event
    assert feed(reaction, buffer, 340, permuted(40)) == [] and reaction.lineage == 1  # no check open


def test_the_fresh_heads_own_early_errors_after_a_retire_do_not_retire_again() -> None:
    reaction, trainer, buffer = make(["boost", "upweight", "retire"])
    feed(reaction, buffer, 0, learned(300))
    reaction.on_detection(Detection("error", "ADWIN", 300))
    assert feed(reaction, buffer, 300, permuted(20)) == [319]  # retired: the head starts afresh
    # The new head is wrong at first; a detection within the cooldown of the retire starts no check.
    reaction.on_detection(Detection("error", "ADWIN", 320))
    assert feed(reaction, buffer, 320, [(label, "x") for label, _ in permuted(60)]) == []
    assert (reaction.lineage, trainer.head_resets) == (2, 1)
    # Past the cooldown, a real concept change is confirmed again.
    feed(reaction, buffer, 380, learned(100))
    reaction.on_detection(Detection("error", "ADWIN", 480))
    assert feed(reaction, buffer, 480, permuted(20)) == [499]
    assert (reaction.lineage, trainer.head_resets) == (3, 2)


def test_a_rise_of_the_error_below_the_bar_is_not_a_concept_change() -> None:
    """A domain shift: errors rise from 20% to 35%, less than concept_error_rise (0.3)."""
    reaction, _trainer, buffer = make(["retire"])
    feed(reaction, buffer, 0, learned(300))
    reaction.on_detection(Detection("error", "ADWIN", 300))
    assert feed(reaction, buffer, 300, learned(100, wrong_every=3)) == []
    assert buffer.retired == [] and reaction.lineage == 1


def test_errors_on_new_labels_are_not_a_concept_change() -> None:
    """Class-incremental: the errors are on labels never seen before the detection."""
    reaction, _trainer, buffer = make(["retire"])
    feed(reaction, buffer, 0, learned(300))
    reaction.on_detection(Detection("error", "ADWIN", 300))
    new = [(f"new{i % 3}", "a") for i in range(100)]  # all wrong, but on new labels
    assert feed(reaction, buffer, 300, new) == [] and buffer.retired == []


@pytest.mark.parametrize("stream", ["representation", "label"])
def test_a_shift_of_inputs_or_label_shares_around_the_detection_is_not_a_concept_change(stream: str) -> None:
    reaction, _trainer, buffer = make(["retire"])
    feed(reaction, buffer, 0, learned(300))
    reaction.on_detection(Detection(stream, "PageHinkley", 290))
    reaction.on_detection(Detection("error", "ADWIN", 300))
    assert feed(reaction, buffer, 300, permuted(100)) == [] and buffer.retired == []


def test_without_the_retire_reaction_nothing_is_retired() -> None:
    reaction, _trainer, buffer = make(["boost", "upweight"])
    feed(reaction, buffer, 0, learned(300))
    reaction.on_detection(Detection("error", "ADWIN", 300))
    assert feed(reaction, buffer, 300, permuted(100)) == [] and reaction.lineage == 1


def test_a_restored_reaction_decides_as_the_original_would_have() -> None:
    """Snapshot half-way through a check (as a checkpoint would, through JSON), restore, go on: same decisions."""
    original, _trainer, buffer = make(["boost", "upweight", "retire"])
    feed(original, buffer, 0, learned(300))
    original.on_detection(Detection("error", "ADWIN", 300))
    feed(original, buffer, 300, permuted(10))
    state = json.loads(json.dumps(original.snapshot()))

    restored, _trainer2, buffer2 = make(["boost", "upweight", "retire"])
    restored.restore(state)
    buffer2.seen = buffer.seen
    assert restored.snapshot() == original.snapshot()
    assert feed(original, buffer, 310, permuted(20)) == feed(restored, buffer2, 310, permuted(20)) == [319]
    assert buffer.retired == buffer2.retired == [300]
    assert restored.snapshot() == original.snapshot()


def test_a_checkpoint_from_before_lineages_restores() -> None:
    reaction, _, _ = make(["boost"])
    reaction.restore({"boost_until": 40, "recent_since": 5, "last": 300})
    assert (reaction.boost_until, reaction.recent_since, reaction.last, reaction.lineage) == (40, 5, 300, 1)


def test_the_buffer_retires_exactly_the_events_before_a_sequence_number() -> None:
    buffer = ReplayBuffer(1000, 10**7, "class_balanced", seed=1)
    buffer.add_many(Event(id=f"old{i}", text="x", label=str(i % 3)) for i in range(60))
    buffer.add_many(Event(id=f"new{i}", text="y", label=str(i % 2)) for i in range(20))
    before = buffer.nbytes
    assert buffer.retire_before(60) == 60
    assert len(buffer) == 20 and 0 < buffer.nbytes < before
    assert {e.id for e in buffer.events()} == {f"new{i}" for i in range(20)}
    assert all(e.id.startswith("new") for e in buffer.sample(200))


def test_a_label_or_representation_shift_never_resets_the_adapter() -> None:
    for stream in ("label", "representation"):
        reaction, trainer, _buffer = make(["boost", "upweight", "new_lineage"])
        response = reaction.on_detection(Detection(stream, "PageHinkley", 400))
        assert response.applied == ["boost", "upweight"] and not response.new_lineage
        assert trainer.resets == 0
    reaction, trainer, _buffer = make(["boost", "upweight", "new_lineage"])
    assert reaction.on_detection(Detection("error", "ADWIN", 400)).applied == ["boost", "upweight", "new_lineage"]
    assert trainer.resets == 1
