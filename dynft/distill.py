"""The per-event loss with knowledge distillation: cross-entropy mixed with temperature-scaled KL.

For an event with a teacher distribution ``q`` (``dynft.teacher``) and student logits ``s``,
with ``T = trainer.distill_temperature`` and ``a = trainer.distill_alpha``::

    kd   = T^2 * KL(q_T || softmax(s / T)),   q_T = softmax(log q / T)
    loss = (1 - a) * CE(s, label) + a * kd    (the event has a label of its own)
    loss = kd                                 (a teacher and no label: the teacher alone)

and plain cross-entropy for an event without a teacher (Hinton et al., "Distilling the knowledge
in a neural network", 2015; the ``T^2`` keeps the soft term's gradients on the scale of the hard
one's as ``T`` changes). A teacher equal to the one-hot label at ``T = 1`` gives exactly the
cross-entropy and its gradient, whatever ``a`` is.

>>> s = torch.tensor([[2.0, 0.0]])
>>> ce = per_event_loss(s, torch.tensor([0]), None, None, None, 0.5, 2.0)
>>> kd = per_event_loss(s, torch.tensor([0]), torch.tensor([[1.0, 0.0]]), torch.tensor([True]),
...                     torch.tensor([True]), 0.5, 1.0)
>>> torch.allclose(ce, kd)
True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_event_loss(
    logits: torch.Tensor,  # (B, C') with C' >= C, float32
    labels: torch.Tensor,  # (B,)
    teacher: torch.Tensor | None,  # (B, C) probabilities; a row without a teacher is its label's one-hot
    teacher_rows: torch.Tensor | None,  # (B,) bool
    hard_rows: torch.Tensor | None,  # (B,) bool: the event has a label of its own
    alpha: float,
    temperature: float,
) -> torch.Tensor:  # (B,)
    """The loss of each event (see the module's docstring)."""
    ce = F.cross_entropy(logits, labels, reduction="none")  # (B,)
    if teacher is None or teacher_rows is None or hard_rows is None:
        return ce
    kd = soft_loss(logits, teacher, temperature)
    mixed = torch.where(hard_rows, (1.0 - alpha) * ce + alpha * kd, kd)
    return torch.where(teacher_rows, mixed, ce)


def soft_loss(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(q_T || softmax(s / T))`` per row; head rows beyond the teacher's width count as probability 0."""
    width = logits.shape[1]
    if teacher.shape[1] < width:  # the head may be wider than the label map of the batch (a restored head)
        teacher = F.pad(teacher, (0, width - teacher.shape[1]))
    teacher = teacher[:, :width].to(logits.dtype)
    with torch.no_grad():
        # log 0 = -inf stays -inf after dividing by T, so a label the teacher excludes stays excluded.
        target = torch.softmax(torch.log(teacher) / temperature, dim=-1) if temperature != 1.0 else teacher
        entropy = torch.xlogy(target, target).sum(dim=-1)  # (B,) sum q log q, 0 log 0 = 0
    log_student = F.log_softmax(logits / temperature, dim=-1)  # (B, C')
    cross = -(target * log_student).sum(dim=-1)  # (B,)
    return temperature**2 * (entropy + cross)


def target_shares(teacher: torch.Tensor, label: int | None, alpha: float) -> torch.Tensor:
    """The label shares an event with a teacher learns, as ``per_event_loss`` mixes them: the
    teacher's row (C,) alone without a label of its own, else ``(1 - a) * one_hot(label) + a * teacher``
    (the word counts of ``dynft.lexical`` count the event's words by these shares)."""
    if label is None:
        return teacher
    mixed = teacher * alpha
    mixed[label] += 1.0 - alpha
    return mixed
