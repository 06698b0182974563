"""Imprinted head rows: a new label's row from its examples' features, before any step trains it.

Qi et al., "Low-shot learning with imprinted weights" (2018): a row that starts as noise needs
many steps before its label can win an argmax; a row that points at the label's mean feature
predicts it at once. One function serves the trainer (``OnlineTrainer._imprint``, which writes
the rows into the head) and the server's fast path (``serving.prototypes``, which scores pending
labels with rows it never writes), so both imprint exactly alike.
"""

from __future__ import annotations

import torch

# Logit scale of the first imprinted rows (logit = scale x cosine). Kept small: a row imprinted
# from one or two examples is a rough guess that training must be able to overrule. Measured
# with MiniLM's trainer on the quality streams (an uncentred first version of _imprint): 10 cost
# the domain-shift stream 7 points and 3 about 1; both gave the class-incremental stream +50.
IMPRINT_LOGIT_SCALE = 3.0


def imprint_rows(
    means: torch.Tensor, centre: torch.Tensor, head: torch.nn.Linear, established: int, features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (P, H) and biases (P,) for the labels whose mean features are ``means`` (P, H).

    What every text shares says nothing about its label, and would make a new row win
    everywhere: a row points from ``centre`` (the mean feature of the texts at hand) to its
    label's mean, and its bias cancels the centre, so its logit is measured from there. A row
    gets the mean norm and bias of the ``established`` rows of ``head``, so a new label neither
    dominates nor vanishes; with none established, a norm that puts logits near
    ``IMPRINT_LOGIT_SCALE`` times a cosine over ``features`` (B, H).
    """
    directions = means.float() - centre
    directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-6)
    if established:
        norm = head.weight[:established].float().norm(dim=1).mean()
        bias = (
            head.bias[:established].float().mean() if head.bias is not None else torch.zeros((), device=centre.device)
        )
    else:
        norm = IMPRINT_LOGIT_SCALE / (features.float() - centre).norm(dim=1).mean().clamp_min(1e-6)
        bias = torch.zeros((), device=centre.device)
    weight = directions * norm
    return weight, bias - weight @ centre
