"""Penalties against forgetting, all measured from the anchor (the serving version's weights and outputs).

- L2 (``trainer.anchor_weight``): ``w/2 * sum (theta - theta*)^2``, every weight pulled alike;
- EWC (``trainer.ewc_weight``; Kirkpatrick et al., "Overcoming catastrophic forgetting", 2017):
  ``w/2 * sum F * (theta - theta*)^2`` with ``F`` a diagonal Fisher estimate made at the anchor
  from the trainer's most recent events, so weights that the served labels depend on are held
  hardest. ``F`` is scaled to mean 1, which puts ``ewc_weight`` on ``anchor_weight``'s scale;
- LwF (``trainer.lwf_weight``; Li & Hoiem, "Learning without forgetting", 2016): on replayed
  events, ``w * T^2 * KL(anchor's softened outputs || the student's)`` over the anchor's labels.

Each is zero at the anchor and grows away from it. All state lives in the trainer, on the
training thread.

>>> anchor = {"w": torch.zeros(2)}
>>> float(weighted_distance({"w": torch.tensor([3.0, 4.0])}, anchor, set(), None))
25.0
>>> float(weighted_distance({"w": torch.tensor([3.0, 4.0])}, anchor, set(), {"w": torch.tensor([2.0, 0.0])}))
18.0
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from dynft.distill import soft_loss


def weighted_distance(
    params: Mapping[str, torch.Tensor],
    anchor: Mapping[str, torch.Tensor],
    head_keys: set[str],
    importance: Mapping[str, torch.Tensor] | None,
) -> torch.Tensor:
    """``sum importance * (param - anchor)^2`` (importance 1 when ``None``) over the anchor's tensors.

    Head tensors are compared on the anchor's rows only: rows of labels that appeared later are free.
    """
    total: torch.Tensor | None = None
    for key, value in anchor.items():
        param = params[key][: value.shape[0]] if key in head_keys else params[key]
        square = (param.float() - value).pow(2)
        term = (square if importance is None else importance[key] * square).sum()
        total = term if total is None else total + term
    return torch.zeros(()) if total is None else total


def lwf_loss(student_logits: torch.Tensor, anchor_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over rows of ``T^2 * KL(softmax(anchor / T) || softmax(student / T))`` on the anchor's labels.

    ``student_logits`` (B, C) and ``anchor_logits`` (B, C_anchor) with C_anchor <= C: the student's
    columns of labels the anchor does not know are left out, so learning them is not penalised.
    """
    width = anchor_logits.shape[1]
    target = torch.softmax(anchor_logits.float(), dim=-1)
    return soft_loss(student_logits[:, :width].float(), target, temperature).mean()


def fisher_diagonal(
    squared_grads: Iterable[Mapping[str, torch.Tensor]], anchor: Mapping[str, torch.Tensor], head_keys: set[str]
) -> dict[str, torch.Tensor]:
    """The mean of squared gradients (one mapping per mini-batch), on the anchor's shapes, scaled to mean 1."""
    sums: dict[str, torch.Tensor] = {key: torch.zeros_like(value) for key, value in anchor.items()}
    batches = 0
    for grads in squared_grads:
        batches += 1
        for key, value in anchor.items():
            grad = grads[key][: value.shape[0]] if key in head_keys else grads[key]
            sums[key] += grad.float().to(value.device)
    count = sum(t.numel() for t in sums.values())
    total = float(sum(float(t.sum()) for t in sums.values()))
    if not batches or total <= 0.0 or count == 0:  # no signal: EWC falls back to a uniform pull
        return {key: torch.ones_like(value) for key, value in anchor.items()}
    scale = count / total
    return {key: t * scale for key, t in sums.items()}
