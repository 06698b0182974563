"""Penalties against forgetting, all measured from the anchor (the serving version's weights and outputs).

- L2 (``trainer.anchor_weight``): ``w/2 * sum (theta - theta*)^2``, every weight pulled alike;
- EWC (``trainer.ewc_weight``; Kirkpatrick et al., "Overcoming catastrophic forgetting", 2017):
  ``w/2 * sum F * (theta - theta*)^2`` with ``F`` a diagonal Fisher estimate made at the anchor
  from the trainer's most recent events, so weights that the served labels depend on are held
  hardest. ``F`` is scaled to mean 1, which puts ``ewc_weight`` on ``anchor_weight``'s scale;
- LwF (``trainer.lwf_weight``; Li & Hoiem, "Learning without forgetting", 2016): on replayed
  events, ``w * T^2 * KL(anchor's softened outputs || the student's)`` over the anchor's labels.

Each is zero at the anchor and grows away from it. ``Forgetting`` holds the anchor, the Fisher
estimate and the recent events it is made from; its trainer owns it, on the training thread.

>>> anchor = {"w": torch.zeros(2)}
>>> float(weighted_distance({"w": torch.tensor([3.0, 4.0])}, anchor, set(), None))
25.0
>>> float(weighted_distance({"w": torch.tensor([3.0, 4.0])}, anchor, set(), {"w": torch.tensor([2.0, 0.0])}))
18.0
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from dynft.distill import soft_loss
from dynft.events import Event

if TYPE_CHECKING:
    from dynft.batching import Batch
    from dynft.model import AdapterState
    from dynft.trainer import OnlineTrainer


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


class Forgetting:
    """A trainer's anchor (the version serving) and the penalties measured from it.

    ``anchor_to`` sets or removes the anchor; ``penalty`` is what a step adds to its loss. Made
    and used by one ``OnlineTrainer``, on its training thread.
    """

    def __init__(self, trainer: OnlineTrainer) -> None:
        self.trainer = trainer
        self.settings = trainer.settings
        self.anchor: dict[str, torch.Tensor] | None = None  # the serving version's weights (fp32, on the device)
        self.state: AdapterState | None = None  # the same, swapped in for LwF's targets
        self.fisher: dict[str, torch.Tensor] | None = None  # EWC's importance of each anchor weight
        self.recent: deque[Event] = deque(maxlen=self.settings.fisher_events)  # what EWC's Fisher is estimated on

    @property
    def wanted(self) -> bool:
        """Whether a regulariser against forgetting is on (L2, EWC or LwF), so that an anchor is wanted."""
        s = self.settings
        return bool(s.anchor_weight or s.ewc_weight or s.lwf_weight)

    def clear(self) -> None:
        self.anchor, self.state, self.fisher = None, None, None

    def anchor_to(self, state: AdapterState | None) -> None:
        """Pull later steps toward ``state`` (checked against the model before anything changes)."""
        if state is None:
            self.clear()
            return
        trainer = self.trainer
        trainer.slots.check(state)
        anchor = {k: t.to(trainer.device, torch.float32, copy=True) for k, t in state.tensors.items()}
        self.fisher = self._estimate_fisher(state, anchor) if self.settings.ewc_weight else None
        self.anchor = anchor
        self.state = state if self.settings.lwf_weight else None

    def penalty(self, replayed_logits: torch.Tensor, lwf_targets: torch.Tensor | None) -> torch.Tensor | None:
        """L2, EWC and LwF together (``None`` when none applies); ``replayed_logits`` are the
        student's on the batch's replayed rows, ``lwf_targets`` the anchor's (``lwf_targets``)."""
        penalty = self.pull()
        if lwf_targets is not None:
            lwf = self.settings.lwf_weight * lwf_loss(replayed_logits, lwf_targets, self.settings.distill_temperature)
            penalty = lwf if penalty is None else penalty + lwf
        return penalty

    def pull(self) -> torch.Tensor | None:
        """The L2 and EWC penalties toward the anchor; ``None`` when neither is on or there is no anchor."""
        l2, ewc = self.settings.anchor_weight, self.settings.ewc_weight
        if self.anchor is None or not (l2 or (ewc and self.fisher is not None)):
            return None
        params, keys = self.trainer.slots.capture(), self.trainer.slots.head_keys
        total = torch.zeros((), device=self.trainer.device)
        if l2:
            total = total + 0.5 * l2 * weighted_distance(params, self.anchor, keys, None)
        if ewc and self.fisher is not None:
            total = total + 0.5 * ewc * weighted_distance(params, self.anchor, keys, self.fisher)
        return total

    @torch.no_grad()
    def lwf_targets(self, batch: Batch) -> torch.Tensor | None:
        """The anchor's logits on the batch's replayed rows (eval mode), or ``None`` when LwF has nothing to do.

        Call before the step's forward pass: it swaps the anchor's weights in and back.
        """
        state, model = self.state, self.trainer.model
        if state is None or not self.settings.lwf_weight or batch.n_fresh >= batch.labels.shape[0]:
            return None
        rows = slice(batch.n_fresh, None)
        was_training = model.training
        model.eval()
        try:
            with self.trainer.swapped(state), self.trainer.autocast():
                logits = model(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows]).logits
        finally:
            model.train(was_training)
        targets: torch.Tensor = logits[:, : len(state.labels)].float()  # (R, C_anchor)
        return targets

    def _estimate_fisher(self, state: AdapterState, anchor: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """EWC's diagonal Fisher at ``state``: squared gradients of the loss on recent events of its labels."""
        trainer, model = self.trainer, self.trainer.model
        known = set(state.labels)
        events = [e for e in self.recent if e.label in known]
        squared: list[dict[str, torch.Tensor]] = []
        was_training = model.training
        model.eval()  # no dropout: the estimate is of the anchor's own function
        try:
            with trainer.swapped(state), torch.enable_grad():
                params = trainer.slots.capture()  # the anchor's own copies, swapped in by reference
                for param in params.values():
                    param.requires_grad_(True)
                for i in range(0, len(events), 8):  # mini-batches of 8: a cheap, coarser estimate
                    batch = trainer.collator(events[i : i + 8], n_fresh=0).to(trainer.device)
                    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                    loss = F.cross_entropy(logits[:, : len(state.labels)].float(), batch.labels)
                    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                    squared.append(
                        {
                            k: torch.zeros_like(p) if g is None else g.detach().pow(2)
                            for (k, p), g in zip(params.items(), grads, strict=True)
                        }
                    )
        finally:
            model.train(was_training)
        return fisher_diagonal(squared, anchor, trainer.slots.head_keys)
