"""The ``teacher`` field of an event: a stronger model's distribution over labels, checked and normalised.

A producer gives a teacher in one of two forms (never both):

- ``"teacher": {"label": probability, ...}``: each probability finite and within [0, 1], their
  sum within ``SUM_TOLERANCE`` of 1 (they are then renormalised exactly);
- ``"teacher_logits": {"label": logit, ...}`` with an optional ``"teacher_temperature": T``
  (finite, > 0, default 1): the distribution is ``softmax(logits / T)``, computed here.

Every teacher label obeys the rules of a label (non-blank, at most ``events.max_label_chars``);
labels the trainer has not seen grow its label space like an event's label. An event with a
teacher and no ``label`` is valid: its label becomes the teacher's top label (the first of equal
ones), which is what it is scored against when held out, and ``label_from_teacher`` is set so
that the trainer learns from the teacher alone. A malformed teacher is dead-lettered as
``invalid_teacher``, a bad temperature as ``invalid_temperature``; the detail names the rule.

>>> normalised({"a": 0.75, "b": 0.25}, None, None, 8)
{'a': 0.75, 'b': 0.25}
>>> sorted(normalised(None, {"a": 0.0, "b": 0.0}, 2.0, 8).values())
[0.5, 0.5]
>>> normalised({"a": 0.9}, None, None, 8)
('invalid_teacher', 'teacher probabilities sum to 0.9, not 1')
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

from dynft.blank import blank

SUM_TOLERANCE = 1e-3  # rounding in a producer's serialised probabilities, not a second distribution
TeacherReason = Literal["invalid_teacher", "invalid_temperature"]


def top_label(scores: object) -> str | None:
    """The label of the highest score in a well-typed, non-empty teacher; ``None`` otherwise (validation says why)."""
    if not isinstance(scores, Mapping) or not scores:
        return None
    best: tuple[float, str] | None = None
    for label, value in scores.items():
        number = _number(value)
        if not isinstance(label, str) or number is None or math.isnan(number):
            return None
        if best is None or number > best[0]:
            best = (number, label)
    return None if best is None else best[1]


def normalised(
    probs: Mapping[str, float] | None,
    logits: Mapping[str, float] | None,
    temperature: float | None,
    max_label_chars: int,
) -> dict[str, float] | tuple[TeacherReason, str]:
    """The teacher's probabilities, or the reason and detail of the rule it breaks."""
    if probs is not None and logits is not None:
        return "invalid_teacher", "give teacher or teacher_logits, not both"
    if temperature is not None:
        if logits is None:
            return "invalid_temperature", "teacher_temperature applies to teacher_logits only"
        value = _number(temperature)
        if value is None or not math.isfinite(value) or value <= 0:
            return "invalid_temperature", f"teacher_temperature must be finite and > 0, got {temperature!r:.40}"
    scores = probs if probs is not None else logits
    name = "teacher" if probs is not None else "teacher_logits"
    if scores is None:
        return "invalid_teacher", "no teacher"
    if not scores:
        return "invalid_teacher", f"{name} is empty"
    for label, raw in scores.items():
        if blank(label):
            return "invalid_teacher", f"{name} has an empty label"
        if len(label) > max_label_chars:
            return "invalid_teacher", f"{name} label of {len(label)} chars > {max_label_chars}"
        number = _number(raw)
        if number is None or not math.isfinite(number):
            return "invalid_teacher", f"{name}[{label[:64]!r}] is not a finite number"
        if probs is not None and not 0.0 <= number <= 1.0:
            return "invalid_teacher", f"teacher[{label[:64]!r}] = {number!r} is not a probability"
    if probs is not None:
        total = math.fsum(float(v) for v in probs.values())
        if abs(total - 1.0) > SUM_TOLERANCE:
            return "invalid_teacher", f"teacher probabilities sum to {total:.6g}, not 1"
        return {label: float(v) / total for label, v in probs.items()}
    return _softmax({k: float(v) for k, v in scores.items()}, float(temperature or 1.0))


def _softmax(logits: dict[str, float], temperature: float) -> dict[str, float]:
    # Shifted by the largest logit, so no exponential overflows; a difference that overflows
    # to infinity gives exp(-inf) = 0, which is right.
    top = max(logits.values())
    exps = {label: math.exp((z - top) / temperature) if z != top else 1.0 for label, z in logits.items()}
    total = math.fsum(exps.values())
    return {label: e / total for label, e in exps.items()}


def _number(value: object) -> float | None:
    """``value`` as a float if it is a JSON number (not a bool); an integer too large for a float is infinite."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf
