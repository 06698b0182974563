"""One encoder pass over a micro-batch whose rows belong to different tasks (multi-adapter serving).

Every adapter tensor of a LoRA version lives in an ``nn.Linear`` (``lora_A``, ``lora_B``, the
head): ``MixedForward`` hooks those modules so that, during one forward pass, each row goes
through its own task's weights, as peft's ``_mixed_batch_forward`` does for named adapters and
S-LoRA/LoRAX do on GPUs: the frozen base weights run once over the whole batch, and only the
small adapter products are done per task group. The heads' outputs are padded to the widest
task's label count; the caller slices each row's own labels. Adapter kinds whose tensors are not
``nn.Linear`` weights (prefix tuning, IA3) are not supported: the engine then runs one forward
pass per task group, as before. ``MixedAnswers`` is the engine's side: it answers the requests
of such a batch from one pass. Used by the engine's worker thread only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from dynft.batching import tokenize
from dynft.lexical import blend
from dynft.metrics import ServerMetrics
from dynft.model import AdapterSlots
from dynft.precision import autocast
from dynft.serving.answers import Answer, Pending, Prediction
from dynft.settings import Settings

if TYPE_CHECKING:
    from dynft.serving.watcher import Lane, LoadedVersion

log = logging.getLogger(__name__)
Params = dict[str, nn.Parameter]  # a version's device-resident tensors by adapter key


class MixedForward:
    """Per-row adapter weights for one model's forward pass; see the module docstring."""

    def __init__(self, slots: AdapterSlots, compute_dtype: torch.dtype | None = None) -> None:
        """``compute_dtype``: autocast's, as the engine's (``dynft.precision``)."""
        self.slots = slots
        self.compute_dtype = compute_dtype
        self._stacked: tuple[tuple[int, ...], dict[str, torch.Tensor], list[Params]] | None = None
        # module -> {"weight": key, "bias": key}: where each adapter tensor of a version goes
        self.modules: dict[nn.Module, dict[str, str]] = {}
        for key, (module, attr) in slots.slots.items():
            self.modules.setdefault(module, {})[attr] = key
        peft_type = str(slots.peft_config.get("peft_type", "")).upper()
        self.supported = (
            peft_type.endswith("LORA")
            and not slots.peft_config.get("use_dora")
            and all(isinstance(m, nn.Linear) and set(a) <= {"weight", "bias"} for m, a in self.modules.items())
        )

    @torch.no_grad()
    def probabilities(
        self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, rows: list[tuple[int, Params, int]]
    ) -> list[list[float]]:
        """Each row's label probabilities from one pass: ``rows`` gives, per row, its version's
        (identity, parameters by adapter key, label count); rows of one identity form a group."""
        members: dict[int, tuple[Params, int]] = {}
        for key, params, labels in rows:
            members.setdefault(key, (params, labels))
        index = {
            key: torch.tensor([i for i, row in enumerate(rows) if row[0] == key], device=ids.device) for key in members
        }
        groups = [(index[key], params) for key, (params, _) in members.items()]
        with self.rows(groups), autocast(ids.device, self.compute_dtype):
            logits = model(input_ids=ids, attention_mask=mask).logits  # (B, the widest head's labels)
        out: list[list[float]] = [[] for _ in rows]
        for key, (_, labels) in members.items():
            probs = torch.softmax(logits.float()[index[key], :labels], dim=-1).cpu()  # (G, labels)
            for i, row in zip(index[key].tolist(), probs.tolist(), strict=True):
                out[i] = row
        return out

    @contextmanager
    def rows(self, groups: Sequence[tuple[torch.Tensor, Params]]) -> Iterator[None]:
        """For the block, row ``i`` of a forward pass uses the parameters of the group that lists it.

        ``groups``: (row indices (G,), a version's parameters by adapter key), covering every row once.
        Each hooked module's tensors are stacked over the groups (narrower heads padded with zero
        rows) and gathered per row, so a module costs one batched product whatever the number of
        groups: a loop over groups made eight tasks' rows cost a third more than one task's.
        """
        size = 1 + max(int(index.max()) for index, _ in groups)
        group_of = torch.empty(size, dtype=torch.long, device=groups[0][0].device)  # (B,): each row's group
        for g, (index, _) in enumerate(groups):
            group_of[index] = g
        stacks = self._stacks([params for _, params in groups])
        hooks = [
            module.register_forward_hook(self._hook(keys, stacks, group_of)) for module, keys in self.modules.items()
        ]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def _stacks(self, versions: list[Params]) -> dict[str, torch.Tensor]:
        """Every adapter key's tensors of ``versions`` stacked (V, out, in) or (V, out); the last
        stacking is kept, as consecutive batches mostly see the same versions."""
        identity = tuple(id(params) for params in versions)
        if self._stacked is not None and self._stacked[0] == identity:
            return self._stacked[1]
        stacks: dict[str, torch.Tensor] = {}
        for keys in self.modules.values():
            for key in keys.values():
                tensors = [params[key] for params in versions]
                width = max(t.shape[0] for t in tensors)
                stacks[key] = torch.stack([F.pad(t, (0, 0) * (t.dim() - 1) + (0, width - t.shape[0])) for t in tensors])
        self._stacked = (identity, stacks, versions)  # the versions: their ids stay theirs while kept
        return stacks

    @staticmethod
    def _hook(keys: dict[str, str], stacks: dict[str, torch.Tensor], group_of: torch.Tensor) -> Any:
        def per_row(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            x = args[0]  # (B, ..., in): rows first, as every hooked Linear sees them
            weight = stacks[keys["weight"]][group_of]  # (B, out, in)
            flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, in)
            y = torch.bmm(flat, weight.transpose(1, 2).to(flat.dtype))  # (B, T, out)
            if "bias" in keys:
                y = y + stacks[keys["bias"]][group_of].to(y.dtype).unsqueeze(1)
            return y.reshape(*x.shape[:-1], weight.shape[1])

        return per_row


class MixedAnswers:
    """The inference engine's answers to a micro-batch of several tasks in one pass (a mixin of
    ``InferenceEngine``, whose worker thread alone calls it; the fields below are the engine's)."""

    lanes: dict[str, Lane]
    settings: Settings
    metrics: ServerMetrics
    tokenizer: PreTrainedTokenizerBase
    max_length: int
    device: torch.device
    compute_dtype: torch.dtype | None
    pad_multiple: int
    _mixed: dict[int, MixedForward]

    def _answer_mixed(self, groups: dict[str, list[Pending]]) -> bool:
        """Answer a batch of several tasks in one forward pass (``dynft.serving.mixed``); whether it
        did. It does not when a task has no version yet, the tasks' versions need different models,
        the adapter kind is not supported, or the pass fails (each group is then answered apart)."""
        actives = [self.lanes[task].active for task in groups]
        if any(a is None for a in actives) or len({id(a.model) for a in actives if a is not None}) > 1:
            return False
        owners = [a for a in actives if a is not None]
        mixed = self._mixed.get(id(owners[0].slots))
        if mixed is None:
            mixed = self._mixed[id(owners[0].slots)] = MixedForward(owners[0].slots, self.compute_dtype)
        if not mixed.supported:
            return False
        texts = [t for group in groups.values() for p in group for t in p.texts]
        rows = [owner for owner, group in zip(owners, groups.values(), strict=True) for p in group for _ in p.texts]
        try:
            answers = self._forward_mixed(mixed, owners[0].model, rows, texts)
        except Exception:
            log.exception("a mixed-task forward pass failed; answering each task's rows apart")
            return False
        start = 0
        for owner, group in zip(owners, groups.values(), strict=True):
            for pending in group:
                end = start + len(pending.texts)
                pending.future.set_result(Answer(answers[start:end], owner.version))
                start = end
        return True

    def _forward_mixed(
        self, mixed: MixedForward, model: PeftModel, rows: list[LoadedVersion], texts: list[str]
    ) -> list[Prediction]:
        self.metrics.batch_size.observe(len(texts))
        enc = tokenize(self.tokenizer, texts, self.max_length, self.pad_multiple)
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        probs = mixed.probabilities(model, ids, mask, [(id(v), v.params, len(v.labels)) for v in rows])
        for i, (owner, text) in enumerate(zip(rows, texts, strict=True)):
            if owner.words is not None:
                adapter = torch.tensor([probs[i]])
                probs[i] = blend(adapter, owner.words.probabilities([text]), owner.words.weight)[0].tolist()
        out = []
        for owner, row in zip(rows, probs, strict=True):
            best = max(range(len(row)), key=row.__getitem__)
            out.append(Prediction(owner.labels[best], dict(zip(owner.labels, row, strict=True))))
        return out
