"""Knowledge distillation: the teacher field's validation, the mixed loss, and a student that learns from it."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch

from dynft.batching import LabelMap
from dynft.distill import per_event_loss, soft_loss
from dynft.events import Event, Rejection, decode
from dynft.settings import EventSettings, Settings
from dynft.trainer import build_trainer

from helpers import keyword_events

LIMITS = EventSettings(max_label_chars=8)


def record(**fields: Any) -> bytes:
    return json.dumps({"id": "1", "text": "hi", **fields}).encode()


def grad_of(loss_of: Any, logits: torch.Tensor) -> torch.Tensor:
    s = logits.clone().requires_grad_(True)
    loss_of(s).sum().backward()
    assert s.grad is not None
    return s.grad


LOGITS = torch.tensor([[1.5, -0.3, 0.2, 0.9], [0.1, 2.2, -1.0, 0.4], [-0.5, 0.0, 3.0, 1.0]])
LABELS = torch.tensor([3, 1, 0])


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_a_teacher_equal_to_the_one_hot_label_gives_the_cross_entropy_gradient(alpha: float) -> None:
    one_hot = torch.nn.functional.one_hot(LABELS, 4).float()
    rows = torch.ones(3, dtype=torch.bool)

    def plain(s: torch.Tensor) -> torch.Tensor:
        return per_event_loss(s, LABELS, None, None, None, alpha, 1.0)

    def distilled(s: torch.Tensor) -> torch.Tensor:
        return per_event_loss(s, LABELS, one_hot, rows, rows, alpha, 1.0)

    assert torch.allclose(distilled(LOGITS), plain(LOGITS), atol=1e-6)
    assert torch.allclose(grad_of(distilled, LOGITS), grad_of(plain, LOGITS), atol=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_the_soft_loss_gradient_is_t_times_the_softened_difference(temperature: float) -> None:
    """d/ds of T^2 KL(q_T || softmax(s/T)) is T (softmax(s/T) - q_T), with q_T = q^(1/T) renormalised."""
    teacher = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.0, 0.5, 0.25, 0.25], [0.05, 0.05, 0.6, 0.3]])
    softened = teacher ** (1 / temperature)
    softened = softened / softened.sum(dim=1, keepdim=True)
    expected = temperature * (torch.softmax(LOGITS / temperature, dim=1) - softened)
    got = grad_of(lambda s: soft_loss(s, teacher, temperature), LOGITS)
    assert torch.allclose(got, expected, atol=1e-5)
    # And the loss is T^2 times the KL divergence computed by hand (0 log 0 = 0).
    log_student = torch.log_softmax(LOGITS / temperature, dim=1)
    kl = (torch.xlogy(softened, softened) - softened * log_student).sum(dim=1)
    assert torch.allclose(soft_loss(LOGITS, teacher, temperature), temperature**2 * kl, atol=1e-5)


def test_the_soft_loss_is_zero_when_the_student_matches_the_teacher() -> None:
    teacher = torch.softmax(LOGITS, dim=1)
    for temperature in (1.0, 3.0):
        assert torch.allclose(soft_loss(LOGITS, teacher, temperature), torch.zeros(3), atol=1e-5)
    assert bool((soft_loss(LOGITS, torch.softmax(-LOGITS, dim=1), 3.0) > 0.1).all())


def test_alpha_mixes_and_teacher_only_rows_ignore_their_label() -> None:
    teacher = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 1.0, 0.0]])
    ce = per_event_loss(LOGITS, LABELS, None, None, None, 0.0, 2.0)
    kd = soft_loss(LOGITS, teacher, 2.0)
    teacher_rows = torch.tensor([True, True, False])
    hard_rows = torch.tensor([True, False, True])
    got = per_event_loss(LOGITS, LABELS, teacher, teacher_rows, hard_rows, 0.25, 2.0)
    assert got[0] == pytest.approx(float(0.75 * ce[0] + 0.25 * kd[0]), rel=1e-6)
    assert got[1] == pytest.approx(float(kd[1]), rel=1e-6)  # no label of its own: the teacher alone
    assert got[2] == pytest.approx(float(ce[2]), rel=1e-6)  # no teacher: cross-entropy alone
    other = per_event_loss(LOGITS, torch.tensor([3, 0, 0]), teacher, teacher_rows, hard_rows, 0.25, 2.0)
    assert other[1] == got[1]


def test_a_head_wider_than_the_teacher_gives_its_extra_rows_probability_zero() -> None:
    teacher = torch.tensor([[0.5, 0.5]])
    wide = soft_loss(torch.tensor([[1.0, 1.0, -20.0]]), teacher, 1.0)
    assert float(wide) == pytest.approx(0.0, abs=1e-6)


def test_a_teacher_without_a_label_takes_its_top_label() -> None:
    event = decode(record(teacher={"neg": 0.3, "pos": 0.7}), LIMITS)
    assert isinstance(event, Event)
    assert (event.label, event.label_from_teacher, event.teacher) == ("pos", True, {"neg": 0.3, "pos": 0.7})
    tie = decode(record(teacher={"b": 0.5, "a": 0.5}), LIMITS)
    assert isinstance(tie, Event) and tie.label == "b"  # the first of equal scores
    labelled = decode(record(label="neg", teacher={"neg": 0.3, "pos": 0.7}), LIMITS)
    assert isinstance(labelled, Event) and (labelled.label, labelled.label_from_teacher) == ("neg", False)


def test_logits_become_probabilities_at_the_stated_temperature() -> None:
    event = decode(record(teacher_logits={"a": 2.0, "b": 0.0, "c": -1e308}, teacher_temperature=2.0), LIMITS)
    assert isinstance(event, Event)
    assert event.teacher_logits is None and event.teacher_temperature is None
    assert event.label == "a"
    assert event.teacher is not None
    assert event.teacher["a"] == pytest.approx(math.e / (math.e + 1.0))
    assert event.teacher["c"] == 0.0
    default = decode(record(label="b", teacher_logits={"a": 1, "b": 0}), LIMITS)
    assert isinstance(default, Event) and default.teacher is not None
    assert default.teacher["a"] == pytest.approx(math.e / (math.e + 1.0))  # temperature 1


def test_probabilities_are_renormalised_within_the_tolerance() -> None:
    event = decode(record(teacher={"a": 0.3335, "b": 0.3335, "c": 0.3335}), LIMITS)
    assert isinstance(event, Event) and event.teacher is not None
    assert math.fsum(event.teacher.values()) == pytest.approx(1.0, abs=1e-12)


BAD_TEACHERS = [
    (record(label="a", teacher={"a": 0.6, "b": 0.3}), "invalid_teacher", "sum to 0.9"),
    (record(label="a", teacher={"a": 1.5, "b": -0.5}), "invalid_teacher", "not a probability"),
    (record(label="a", teacher={}), "invalid_teacher", "teacher is empty"),
    (record(teacher={}), "invalid_teacher", "teacher is empty"),
    # Without a label the teacher's top label is the label: the rule it breaks is named, not the missing label.
    (b'{"id": "1", "text": "hi", "teacher": {"a": NaN, "b": 1}}', "invalid_teacher", "teacher['a'] is not a finite"),
    (record(teacher={"a": 0.6, "b": 0.3}), "invalid_teacher", "sum to 0.9"),
    (
        b'{"id": "1", "text": "hi", "teacher_logits": {"a": NaN}, "teacher_temperature": -1}',
        "invalid_temperature",
        "> 0",
    ),
    (record(label="a", teacher={"": 1.0}), "invalid_teacher", "empty label"),
    (record(label="a", teacher={"abcdefghi": 1.0}), "invalid_teacher", "9 chars > 8"),
    (record(label="a", teacher={"a": "high"}), "invalid_teacher", "teacher.a"),
    (record(label="a", teacher={"a": True}), "invalid_teacher", "teacher.a"),
    (record(label="a", teacher=["a"]), "invalid_teacher", "teacher"),
    (b'{"id": "1", "text": "hi", "label": "a", "teacher": {"a": NaN}}', "invalid_teacher", "not a finite"),
    (b'{"id": "1", "text": "hi", "teacher_logits": {"a": 1e400, "b": 0}}', "invalid_teacher", "not a finite"),
    (b'{"id": "1", "text": "hi", "teacher": {"a": 1' + b"0" * 5000 + b"}}", "invalid_teacher", "not a finite"),
    (record(label="a", teacher={"a": 1.0}, teacher_logits={"a": 1.0}), "invalid_teacher", "not both"),
    # A teacher label that cannot be UTF-8 is the teacher's problem, also where it became the label.
    (b'{"id": "1", "text": "hi", "teacher": {"a\\ud800": 1.0}}', "invalid_teacher", "lone surrogate"),
    (record(teacher_logits={"a": 1.0}, teacher_temperature=0), "invalid_temperature", "> 0"),
    (record(teacher_logits={"a": 1.0}, teacher_temperature=-1.0), "invalid_temperature", "> 0"),
    (record(teacher_logits={"a": 1.0}, teacher_temperature="hot"), "invalid_temperature", "teacher_temperature"),
    (record(teacher={"a": 1.0}, teacher_temperature=2.0), "invalid_temperature", "teacher_logits only"),
    (
        b'{"id": "1", "text": "hi", "teacher_logits": {"a": 1}, "teacher_temperature": Infinity}',
        "invalid_temperature",
        ">",
    ),
]


@pytest.mark.parametrize(("raw", "reason", "detail"), BAD_TEACHERS)
def test_malformed_teachers_are_rejected_with_their_reason(raw: bytes, reason: str, detail: str) -> None:
    rejection = decode(raw, LIMITS)
    assert isinstance(rejection, Rejection), rejection
    assert (rejection.reason, rejection.event_id) == (reason, "1")
    assert detail in rejection.detail


@pytest.mark.parametrize("teacher", [None, {"b": 1.0}])
def test_a_record_cannot_say_its_label_came_from_the_teacher(teacher: dict[str, float] | None) -> None:
    """Found by a probe: ``"label_from_teacher": true`` in a record was taken, so its given label
    was left out of the loss while the event was held out and scored under it (and without a
    teacher the record was refused). Only decoding sets it: in a record it is an unknown field."""
    fields = {"label": "a", "label_from_teacher": True} | ({"teacher": teacher} if teacher else {})
    event = decode(record(**fields), LIMITS)
    assert isinstance(event, Event) and (event.label, event.label_from_teacher) == ("a", False)
    without = {key: value for key, value in fields.items() if key != "label_from_teacher"}
    assert event == decode(record(**without), LIMITS) == decode(record(**without, label_from_teacher="x"), LIMITS)


def test_a_teacher_survives_the_replay_buffers_round_trip() -> None:
    event = decode(record(teacher={"neg": 0.25, "pos": 0.75}), LIMITS)
    assert isinstance(event, Event)
    assert Event.from_builtins(event.to_builtins()) == event
    assert event.nbytes > decode(record(label="pos"), LIMITS).nbytes  # type: ignore[union-attr]


def test_teacher_labels_grow_the_label_map_all_or_none() -> None:
    labels = LabelMap(["a"], capacity=3)
    assert not labels.admit_all(["a", "b", "c", "d"])
    assert labels.labels == ["a"]  # nothing added when all do not fit
    assert labels.admit_all(["b", "a", "c", "c"])
    assert labels.labels == ["a", "b", "c"]


def teacher_events(n: int, seed: int, labelled_every: int) -> list[Event]:
    """Keyword events whose label is known only to a (confident) teacher, but for every ``labelled_every``-th."""
    out = []
    for i, row in enumerate(keyword_events(n, ["alpha", "beta"], seed=seed)):
        teacher = {label: 0.8 if label == row["label"] else 0.2 for label in ("alpha", "beta")}
        raw = (
            {**row, "teacher": teacher}
            if i % labelled_every == 0
            else {"id": row["id"], "text": row["text"], "teacher": teacher}
        )
        event = decode(json.dumps(raw).encode(), EventSettings())
        assert isinstance(event, Event)
        out.append(event)
    return out


def test_a_student_learns_the_teachers_labels_from_teachers_alone(tiny_settings: Settings) -> None:
    trainer = build_trainer(tiny_settings.model, tiny_settings.adapter, tiny_settings.trainer)
    stream = teacher_events(960, seed=1, labelled_every=10)
    assert sum(e.label_from_teacher for e in stream) == 864
    for i in range(0, len(stream), 16):
        chunk = stream[i : i + 16]
        batch = trainer.collator(chunk, n_fresh=len(chunk))
        assert batch.teacher is not None and batch.num_labels == 2
        assert trainer.step(batch).skipped is None
    held_out = teacher_events(200, seed=2, labelled_every=1000)
    predictions = trainer.predictions(held_out)
    # Scored against the teacher's top label, as held-out events without a label are.
    accuracy = sum(p == e.label for p, e in zip(predictions, held_out, strict=True)) / len(held_out)
    assert accuracy > 0.85


def test_target_shares_are_the_mixture_the_loss_learns() -> None:
    from dynft.distill import target_shares

    teacher = torch.tensor([0.9, 0.1, 0.0])
    assert torch.equal(target_shares(teacher, None, 0.5), teacher)  # the teacher alone labelled it
    mixed = target_shares(teacher, 1, 0.25)
    assert torch.allclose(mixed, torch.tensor([0.225, 0.775, 0.0])) and mixed.sum().item() == pytest.approx(1.0)
    assert torch.equal(teacher, torch.tensor([0.9, 0.1, 0.0]))  # the batch's row is not changed in place
    assert torch.allclose(target_shares(teacher, 0, 0.0), torch.tensor([1.0, 0.0, 0.0]))  # alpha 0: the label
