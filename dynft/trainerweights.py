"""What goes into and out of a trainer's weights: exported versions, loaded versions, checkpoints,
resets, and the answers of the live weights or of a version swapped in.

A mixin of ``OnlineTrainer`` (``dynft.trainer``), which owns the fields declared below. Every
verb that puts weights in checks everything first and changes nothing when something does not
fit (``AdapterMismatchError``); the parameter objects themselves stay (values are copied in,
the head grows in place), so the optimizer and the other tasks' references keep pointing at
them. Called on the training thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from dynft.batching import Collator, LabelMap
from dynft.errors import AdapterMismatchError
from dynft.events import Event
from dynft.forgetting import Forgetting
from dynft.lexical import Lexicon, WordScorer, blend
from dynft.model import AdapterSlots, AdapterState, grow_head
from dynft.snapshot import check_snapshot


class TrainerWeights:
    """Export, load, snapshot, restore and reset; ``OnlineTrainer`` provides the fields below."""

    model: PeftModel
    collator: Collator
    device: torch.device
    slots: AdapterSlots
    optimizer: torch.optim.Optimizer
    forgetting: Forgetting
    steps: int
    skipped: int
    lr_scale: float
    imprinted: int
    owns_adapter: bool
    shares_adapter: bool
    lexicon: Lexicon | None  # word counts served beside the adapter (trainer.lexical_blend)
    _init_state: dict[str, torch.Tensor]

    @property
    def label_map(self) -> LabelMap:
        raise NotImplementedError

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def exported_labels(self) -> list[str]:
        """Labels that have a head row (the label map may be ahead of the model by one batch)."""
        return self.label_map.labels[: self.slots.head.out_features]

    def export(self) -> AdapterState:
        labels = self.exported_labels()
        state = self.slots.export(labels)
        if self.lexicon is not None:
            state.lexical = self.lexicon.state(len(labels))
        return state

    def _lexicon_from(self, tensors: dict[str, torch.Tensor] | None, labels: int) -> Lexicon | None:
        """Word counts to continue from (checked; nothing changes here): fresh ones where the
        source has none, or counts of another ``trainer.lexical_buckets``."""
        if self.lexicon is None:
            return None
        if tensors:
            try:
                loaded = Lexicon.from_state(tensors, labels)
            except ValueError as exc:
                raise AdapterMismatchError(str(exc)) from exc
            if loaded.buckets == self.lexicon.buckets:
                return loaded
        return Lexicon(self.lexicon.buckets)

    def all_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.slots.capture().values())

    def load(self, state: AdapterState) -> None:
        """Continue from a published adapter: everything is checked first, then its labels and weights go in.

        Raises ``AdapterMismatchError`` and changes nothing when the adapter does not fit the model,
        or when its labels do not extend the trainer's label map (head rows are matched by position).
        """
        live = self.label_map.labels
        if state.labels[: len(live)] != live or self.slots.head.out_features > max(1, len(state.labels)):
            raise AdapterMismatchError("the adapter's labels do not extend the trainer's label map")
        self.slots.check(state)
        lexicon = self._lexicon_from(state.lexical, len(state.labels))
        self.label_map.ids(state.labels)
        grow_head(self.model, len(state.labels), self.optimizer)
        self.imprinted = len(state.labels)
        self.lexicon = lexicon
        with torch.no_grad():
            for key, param in self.slots.capture().items():
                if self.owns_adapter or key in self.slots.head_keys:  # a task's old version: no roll-back
                    param.copy_(state.tensors[key].to(param.device, param.dtype))

    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything needed to continue exactly: weights, optimizer, labels, counters, RNG.

        Copies, not views: a snapshot kept across a step still holds the weights it was taken
        with (the optimizer's state dict hands out its live moment tensors).
        """
        tensors = {f"param.{k}": p.detach().clone() for k, p in self.slots.capture().items()}
        optim = self.optimizer.state_dict()
        for index, values in optim["state"].items():
            for name, value in values.items():
                tensors[f"optim.{index}.{name}"] = value.clone() if isinstance(value, torch.Tensor) else value
        tensors["rng.torch"] = torch.get_rng_state()
        if self.lexicon is not None:
            tensors.update(self.lexicon.state(len(self.label_map)))
        groups = [{k: v for k, v in g.items()} for g in optim["param_groups"]]
        state = {
            "labels": self.label_map.labels,
            "steps": self.steps,
            "skipped": self.skipped,
            "lr_scale": self.lr_scale,
            "param_groups": groups,
            "peft_config": self.slots.peft_config,  # so a restart with another adapter can say what changed
        }
        return tensors, state

    def restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Load a ``snapshot``: all of it is checked first, then labels, head, weights, optimizer and RNG go in.

        A checkpoint that does not fit this model raises ``AdapterMismatchError`` naming what
        differs, and the trainer is left exactly as it was.
        """
        checked = check_snapshot(self.slots, self.optimizer, self.label_map.labels, tensors, state)
        lexicon = self._lexicon_from(
            {k: t for k, t in tensors.items() if k.startswith("lexical.")}, len(checked.labels)
        )
        self.label_map.ids(checked.labels)
        grow_head(self.model, checked.head_rows, self.optimizer)
        with torch.no_grad():
            for key, param in self.slots.capture().items():
                param.copy_(checked.params[key].to(param.device, param.dtype))
        self.optimizer.load_state_dict({"state": checked.optim_state, "param_groups": checked.param_groups})
        torch.set_rng_state(checked.rng)
        self.steps, self.skipped, self.lr_scale = checked.counters
        self.imprinted = min(checked.head_rows, len(checked.labels))
        self.lexicon = lexicon

    def reset_adapter(self) -> None:
        """Start a new lineage: adapter and head back to their initial weights, optimizer state dropped.

        An adapter other tasks share is theirs too: only the head starts afresh then.
        """
        if self.shares_adapter:
            self.reset_head()
            return
        self.forgetting.clear()  # a new lineage is not pulled back
        self.imprinted = 0
        if self.lexicon is not None:  # the labels may mean something else in the new lineage
            self.lexicon.reset()
        with torch.no_grad():
            for key, param in self.slots.capture().items():
                if key not in self.slots.head_keys:
                    param.copy_(self._init_state[key])
                elif param.dim() > 1:
                    nn.init.normal_(param, std=0.02)
                else:
                    param.zero_()
        self.optimizer.state.clear()

    def reset_head(self) -> None:
        """Start the head afresh, keeping the adapter: for a concept change, where the features still hold.

        The old head maps the same inputs to the old labels and would have to be unlearned; a
        fresh one (imprinted again from the next examples where imprinting is on) learns the new
        mapping at the head's learning rate. Its optimizer state goes with it, and so do the word
        counts, which map words to the old labels as the head did.
        """
        self.imprinted = 0
        if self.lexicon is not None:
            self.lexicon.reset()
        with torch.no_grad():
            for key, param in self.slots.capture().items():
                if key not in self.slots.head_keys:
                    continue
                if param.dim() > 1:
                    nn.init.normal_(param, std=0.02)
                else:
                    param.zero_()
                self.optimizer.state.pop(param, None)

    # -- answers by the live weights or a version swapped in (the gate's, LwF's) --------------

    @torch.no_grad()
    def predict(
        self, events: Sequence[Event], labels: Sequence[str], batch_size: int = 32, words: WordScorer | None = None
    ) -> list[str]:
        """Label predictions for ``events`` by the installed weights (eval mode, no training),
        blended with ``words`` as the server blends a version's word counts."""
        self.model.eval()
        out: list[str] = [""] * len(events)
        # Texts of similar length share a batch, and batches are small, so little is padded (the
        # gate costs this loop: with 64 texts in one batch, most of its tokens were padding).
        order = sorted(range(len(events)), key=lambda k: len(events[k].text))
        for i in range(0, len(order), batch_size):
            rows = order[i : i + batch_size]
            texts = [events[k].text for k in rows]
            enc = self.collator.encode(texts)
            with self.autocast():
                logits = self.model(
                    input_ids=enc["input_ids"].to(self.device), attention_mask=enc["attention_mask"].to(self.device)
                ).logits[:, : len(labels)]
            if words is not None:
                logits = blend(torch.softmax(logits.float(), dim=-1).cpu(), words.probabilities(texts), words.weight)
            for k, j in zip(rows, logits.argmax(dim=-1).tolist(), strict=True):
                out[k] = labels[j]
        return out

    def predictions(self, events: Sequence[Event], state: AdapterState | None = None) -> list[str]:
        """What the server would answer for ``events`` (adapter and word counts) with the live
        weights, or with ``state`` swapped in for the call."""
        if state is None:
            labels = self.exported_labels()
            live = WordScorer(self.lexicon, len(labels)) if self.lexicon is not None else None
            return self.predict(events, labels, words=live)
        words = None
        if self.lexicon is not None:  # the version's own, if the blend is on
            try:
                words = state.word_scorer()
            except ValueError as exc:
                raise AdapterMismatchError(f"the version's word counts: {exc}") from exc
        with self.swapped(state):
            return self.predict(events, state.labels, words=words)

    @contextlib.contextmanager
    def swapped(self, state: AdapterState) -> Iterator[None]:
        """Temporarily install ``state`` (checked first); the training weights come back afterwards."""
        prepared = self.slots.prepare(state)
        saved = self.slots.capture()
        self.slots.install(prepared)
        try:
            yield
        finally:
            self.slots.install(saved)
