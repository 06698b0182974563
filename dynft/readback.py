"""A training step's results, brought from the device to the host in one copy.

On a GPU every ``.item()``, ``.tolist()`` or ``bool(tensor)`` waits for the queue of kernels to
drain; a step that read its loss, predictions, losses and gradient norm one by one would stall
four times. ``read_back`` packs them into one tensor and copies once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ReadBack:
    """What a step hands the daemon, on the host."""

    loss: float
    grad_norm: float
    predictions: list[int]  # label indices of the fresh rows
    losses: list[float]
    features: list[list[float]] | None
    probabilities: list[list[float]] | None = None  # the fresh rows' softmax, when asked for


def read_back(
    loss: torch.Tensor,
    grad_norm: torch.Tensor,
    logits: torch.Tensor,
    losses: torch.Tensor,
    features: torch.Tensor | None,
    probabilities: bool = False,
) -> ReadBack:
    """One device-to-host copy for all of a step's results: they are packed into one float
    tensor on the device (label indices are exact in float32 far beyond ``trainer.max_labels``)."""
    rows, classes = logits.shape[0], logits.shape[-1]
    parts = [
        loss.detach().float().reshape(1),
        grad_norm.detach().float().reshape(1),
        logits.detach().argmax(dim=-1).float(),  # (R,)
        losses.detach().float(),  # (R,)
    ]
    if features is not None:
        parts.append(features.detach().float().reshape(-1))  # (R * H,)
    if probabilities:
        parts.append(torch.softmax(logits.detach().float(), dim=-1).reshape(-1))  # (R * C,)
    flat: list[float] = torch.cat(parts).cpu().tolist()
    width = features.shape[-1] if features is not None else 0
    tail = flat[2 + 2 * rows :]
    probs = tail[rows * width :]
    return ReadBack(
        loss=flat[0],
        grad_norm=flat[1],
        predictions=[int(x) for x in flat[2 : 2 + rows]],
        losses=flat[2 + rows : 2 + 2 * rows],
        features=[tail[i * width : (i + 1) * width] for i in range(rows)] if features is not None else None,
        probabilities=[probs[i * classes : (i + 1) * classes] for i in range(rows)] if probabilities else None,
    )
