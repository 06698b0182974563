"""The online trainer: test-then-train LoRA (or IA3, prefix) updates, one batch at a time.

``step`` is the whole training step and reads top to bottom: forward, per-event losses,
backward, clipping, one read-back of everything the daemon needs (the loss, the gradient
norm, and the prequential predictions for the fresh rows, made before the update that learns
from them), then AdamW. A non-finite loss or gradient skips the update and is counted; the
weights never see it. With ``trainer.anchor_weight`` > 0 the backward pass
also carries an L2 pull toward the serving version (``anchor_to``), against forgetting.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from dynft.batching import Batch, Collator, LabelMap, pad_multiple_for
from dynft.distill import per_event_loss, target_shares
from dynft.errors import ConfigError
from dynft.events import Event
from dynft.families import base_dtype, read_positions, size_line, token_limit
from dynft.forgetting import Forgetting
from dynft.imprint import imprint_rows
from dynft.lexical import Lexicon, blend
from dynft.model import (
    AdapterSlots,
    AdapterState,
    Pooling,
    build_model,
    grow_head,
    head_linear,
    load_tokenizer,
    peft_config_from_settings,
    pick_device,
    resolve_model_path,
    resolve_pooling,
)
from dynft.precision import autocast, autocast_dtype
from dynft.readback import read_back
from dynft.settings import AdapterSettings, ModelSettings, TrainerSettings
from dynft.trainerweights import TrainerWeights

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What one step did. ``predictions``/``losses`` cover the fresh rows only."""

    loss: float
    skipped: str | None  # None, "non_finite_loss" or "non_finite_grad"
    predictions: list[str | None] = field(default_factory=list)  # None: no label was known yet
    losses: list[float] = field(default_factory=list)
    lr: float = 0.0
    seconds: float = 0.0
    features: list[list[float]] | None = None  # the fresh rows' mean token embeddings, with capture_features


class OnlineTrainer(TrainerWeights):
    """Owns the peft model, its optimizer and its label map."""

    def __init__(
        self,
        model: PeftModel,
        collator: Collator,
        settings: TrainerSettings,
        device: torch.device,
        base_model_path: Path | None = None,
        pooling: Pooling = "cls",
        compute_dtype: torch.dtype | None = None,
    ):
        """``compute_dtype``: what the forward and backward passes compute in under autocast (None:
        the weights' own dtype); ``dynft.precision.autocast_dtype`` picks it from ``model.autocast``."""
        self.model = model
        self.compute_dtype = compute_dtype
        self.base_model_path = base_model_path  # recorded with every published version
        self.pooling = pooling  # how ``model`` pools (see dynft.pooling.resolve_pooling), recorded likewise
        self.collator = collator
        self.settings = settings
        self.device = device
        self.slots = AdapterSlots(model)
        self.steps = 0
        self.skipped = 0
        self.lr_scale = 1.0  # raised temporarily by drift reactions
        self.capture_features = False  # return the fresh rows' mean token embeddings (a representation drift detector)
        self.imprinted = 0  # head rows below this index have been imprinted or trained (see _imprint)
        self.shares_adapter = False  # other tasks train the same adapter objects (see fork)
        self.owns_adapter = True  # False: the shared adapter is another trainer's; ``load`` takes only the head
        self._moments_of: OnlineTrainer | None = None  # whose AdamW moments of the shared adapter a fork uses
        self.imprints = settings.imprint_new_labels == "on" or (
            settings.imprint_new_labels == "auto" and pooling == "mean"
        )
        self.forgetting = Forgetting(self)  # the anchor and the penalties against forgetting
        self.lexicon = Lexicon(settings.lexical_buckets) if settings.lexical_blend else None
        self._init_state = {k: p.detach().clone() for k, p in self.slots.capture().items()}
        self._own = self.slots.capture()  # this trainer's parameter objects (see activate)
        self.optimizer = self._make_optimizer()
        # Lazily compiled at the first step; a task's fork shares its parent's (its weights are
        # swapped in by reference, which the compiled graph reads as inputs).
        self._compiled = compile_model(model, settings.compile_backend) if settings.compile else None

    @property
    def label_map(self) -> LabelMap:
        return self.collator.label_map

    def activate(self) -> None:
        """Install this trainer's adapter and head in the model, which other tasks' trainers share.

        A few reference writes (``AdapterSlots.install``); the objects are stable (restores and
        head growth change them in place), so the optimizer keeps pointing at them.
        """
        self.slots.install(self._own)

    def fork(self, collator: Collator, share_adapter: bool = False) -> OnlineTrainer:
        """A trainer for another task on the same model: a fresh adapter (this one's initial
        weights), a one-row head, its own optimizer and counters, and ``collator``'s label map.

        ``share_adapter`` (``tasks.sharing = shared``): the fork's adapter is this trainer's own
        parameter objects, so every task's step moves the one adapter; only the head is its own.
        The shared weights' AdamW moments are one set too (``_share_moments``), as one optimizer
        of a multi-task model would keep them. Both trainers then ``shares_adapter``: a reset (a
        drift reaction) starts only the head afresh.
        The fork is left installed; call ``activate`` on a trainer before using it.
        """
        fresh: dict[str, nn.Parameter] = {}
        with torch.no_grad():
            for key, param in self.slots.capture().items():
                if key in self.slots.head_keys:
                    row = torch.empty_like(param[:1])
                    nn.init.normal_(row, std=0.02) if row.dim() > 1 else row.zero_()
                elif share_adapter:
                    fresh[key] = param
                    continue
                else:
                    row = self._init_state[key].clone()
                fresh[key] = nn.Parameter(row, requires_grad=True)
        self.slots.install(fresh)
        fork = OnlineTrainer(
            self.model, collator, self.settings, self.device, self.base_model_path, self.pooling, self.compute_dtype
        )
        fork.shares_adapter = self.shares_adapter = share_adapter or self.shares_adapter
        fork.owns_adapter = not share_adapter
        fork._compiled = self._compiled
        if share_adapter:
            fork._moments_of = self
        return fork

    def _share_moments(self) -> None:
        """A fork's AdamW state of the shared adapter is its home trainer's, entry by entry.

        With a set of moments per task, each task's step moved the shared weights by a full
        normalised step in its own direction: with three tasks about three times the learning
        rate, and the tasks' disagreements never averaged out. On the test suite's tiny model
        ([CLS] pooling, three tasks of 300 events, eight seeds) the named tasks' accuracy after
        the stream was 0.59 on average with a set per task and 0.71 with one; the default
        task's 0.81 and 0.94. On MiniLM (``benchmarks.quality.multitask --only shared``, three
        seeds) the prequential mean moved from 56.9 to 57.9. Linked again before every step,
        since a restore or a reset of either optimizer makes new state dicts; moments restored
        into only one side are kept.
        """
        if self._moments_of is None:
            return
        mine, theirs = self.optimizer.state, self._moments_of.optimizer.state
        for param in self.optimizer.param_groups[0]["params"]:  # the adapter's group (_make_optimizer)
            shared = theirs[param]  # a defaultdict: an empty entry if the home has not stepped yet
            if mine.get(param) is not shared:
                if not shared and mine.get(param):
                    shared.update(mine[param])
                mine[param] = shared

    def _make_optimizer(self) -> torch.optim.Optimizer:
        head = head_linear(self.model)
        head_params = [p for p in head.parameters() if p.requires_grad]
        head_ids = {id(p) for p in head_params}
        adapter_params = [p for p in self.model.parameters() if p.requires_grad and id(p) not in head_ids]
        groups = [
            {"params": adapter_params, "lr": self.settings.lr, "base_lr": self.settings.lr},
            {"params": head_params, "lr": self.settings.head_lr, "base_lr": self.settings.head_lr, "weight_decay": 0.0},
        ]
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(groups, weight_decay=self.settings.weight_decay, fused=fused)

    def _set_lr(self) -> float:
        warmup = min(1.0, (self.steps + 1) / self.settings.warmup_steps) if self.settings.warmup_steps else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * warmup * self.lr_scale
        return float(self.optimizer.param_groups[0]["lr"])

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        return autocast(self.device, self.compute_dtype)

    @functools.cached_property
    def _scaler(self) -> torch.amp.GradScaler:
        # fp16 gradients underflow without loss scaling; with bf16 or fp32 the scaler passes through.
        return torch.amp.GradScaler(
            self.device.type, enabled=self.compute_dtype == torch.float16 and self.device.type == "cuda"
        )

    def step(self, batch: Batch) -> StepResult:
        """One test-then-train update on ``batch``.

        Everything the daemon reads back (loss, gradient norm, the fresh rows' predictions,
        losses and features) reaches the host in one transfer (``read_back``), after the backward
        pass: on a GPU each read is a synchronisation that drains the queue of kernels. So a
        non-finite loss is not looked at before the backward pass; it makes the gradient norm
        non-finite too, and either way the optimizer step is skipped.
        """
        started = time.perf_counter()
        if batch.num_labels > self.slots.head.out_features:  # both checks skip a walk over every module
            grow_head(self.model, batch.num_labels, self.optimizer)
        host, batch = batch, batch.to(self.device)  # the host copy's teachers feed the word counts, no read-back
        known = self.imprinted  # the labels the weights knew before this step: only these can be predicted
        if batch.num_labels > self.imprinted:
            self._imprint(batch)
        lr = self._set_lr()
        lwf_targets = self.forgetting.lwf_targets(batch)  # before the forward pass: it swaps weights in place
        if not self.model.training:  # only ``predict`` switches to eval
            self.model.train()
        logits = self._forward(batch)  # (B, C)
        losses = per_event_loss(  # (B,): cross-entropy, mixed with the teachers' where events have one
            logits.float(),
            batch.labels,
            batch.teacher,
            batch.teacher_rows,
            batch.hard_rows,
            self.settings.distill_alpha,
            self.settings.distill_temperature,
        )
        loss = (losses * batch.weights).sum() / batch.weights.sum().clamp_min(1e-8)
        penalty = self.forgetting.penalty(logits[batch.n_fresh :], lwf_targets)
        self._scaler.scale(loss if penalty is None else loss + penalty).backward()  # type: ignore[no-untyped-call]
        self._scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = nn.utils.clip_grad_norm_(params, self.settings.max_grad_norm)
        # Test before train: the predictions come from the weights before this update.
        pooled = self._token_means(batch) if self.capture_features else None  # (n_fresh, E)
        # A label new in this batch is not predicted: its row was imprinted from these very events
        # (or is untrained), so predicting it would score an event with its own label.
        scored = logits[: batch.n_fresh].detach()
        if known < scored.shape[-1]:
            scored = scored.masked_fill(torch.arange(scored.shape[-1], device=scored.device) >= known, float("-inf"))
        back = read_back(loss, grad_norm, scored, losses[: batch.n_fresh], pooled, self.lexicon is not None)
        labels = self.label_map.labels
        result = StepResult(
            loss=back.loss,
            skipped=None,
            predictions=[labels[i] if i < known else None for i in back.predictions],
            losses=back.losses,
            lr=lr,
            features=back.features,
        )
        if not math.isfinite(back.loss):
            result.skipped = "non_finite_loss"
        elif not math.isfinite(back.grad_norm):
            result.skipped = "non_finite_grad"
        else:
            self._share_moments()
            self._scaler.step(self.optimizer)
        self._scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if result.skipped:
            self.skipped += 1
        else:
            self.steps += 1
            self.forgetting.recent.extend(batch.events)
            blended = self._count_words(batch.events[: batch.n_fresh], back.probabilities, known, host.teacher)
            if blended is not None:  # what users would be answered, the gate's fallback check included
                result.predictions = [labels[i] for i in blended]
        result.seconds = time.perf_counter() - started
        return result

    def _count_words(
        self, fresh: Sequence[Event], adapter: list[list[float]] | None, known: int, teacher: torch.Tensor | None
    ) -> list[int] | None:
        """Test, then train the word counts on the fresh events (``dynft.lexical``), given the
        adapter's probabilities of them from before this step. Returns the blend's predictions of
        them (label indices below ``known``: what a version cut before this step would answer), or
        None without counts. An event with a teacher is counted softly, by the distribution its loss
        learns: its row of ``teacher`` (the batch's teacher probabilities by label id) when the
        teacher alone labelled it, that row mixed with its own label's one-hot by
        ``trainer.distill_alpha`` when it has both."""
        if self.lexicon is None or not fresh or adapter is None:
            return None
        weight = self.lexicon.weight  # the share before these events move it
        labels = len(self.label_map)
        ids = [self.label_map.get(e.label) for e in fresh]
        alpha = self.settings.distill_alpha
        soft = {i: target_shares(teacher[i], None if e.label_from_teacher else ids[i], alpha)
                for i, e in enumerate(fresh) if teacher is not None and e.teacher is not None}  # fmt: skip
        probs = torch.tensor(adapter)
        counts = self.lexicon.observe([e.text for e in fresh], ids, labels, probs, soft)
        if not known:  # no label was known before this step: nothing can be predicted
            return None
        mixed = blend(probs[:, :known], counts[:, :known], weight)
        return [int(i) for i in mixed.argmax(dim=-1)]

    def _forward(self, batch: Batch) -> torch.Tensor:
        """The logits of this batch, (B, C)."""
        forward = self.model if self._compiled is None else self._compiled
        with self.autocast():
            logits: torch.Tensor = forward(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return logits

    def _token_means(self, batch: Batch) -> torch.Tensor:
        """The fresh rows' input token embeddings averaged over their tokens, (n_fresh, E).

        Read from the base model's embedding table, which the adapter methods leave alone (unless
        ``adapter.target_modules`` names it): what the representation detector watches moves with
        the words, not with what the adapter learned (the head's input did both, and raised
        alarms on stationary streams). A lookup, not a forward pass."""
        with torch.no_grad():
            ids, mask = batch.input_ids[: batch.n_fresh], batch.attention_mask[: batch.n_fresh, :, None]
            embedded: torch.Tensor = self.model.get_input_embeddings()(ids).float()  # (R, T, E)
            return (embedded * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1).float()

    @torch.no_grad()
    def _imprint(self, batch: Batch) -> None:
        """Start the head rows of labels new in ``batch`` at their examples' centred mean feature
        (``dynft.imprint``), so they predict their label from the next event on: most of the
        prequential accuracy of a class-incremental stream, where a label may have only a few
        examples. Off by default unless the model pools by mean:
        prototypes of random or [CLS] features slowed learning down in tests (tests/test_pooling.py).
        """
        first_new = self.imprinted
        self.imprinted = batch.num_labels
        if not self.imprints:
            return
        new_rows = batch.labels >= first_new
        if not bool(new_rows.any()):
            return
        features = self._head_inputs(batch.input_ids, batch.attention_mask).float()  # (B, H)
        if features.dim() == 3:  # a decoder's score reads every position, then keeps the last token's
            features = read_positions(features, batch.input_ids, self.model.config.pad_token_id)
        labels = sorted(set(batch.labels[new_rows].tolist()))
        means = torch.stack([features[batch.labels == label].mean(dim=0) for label in labels])
        head = self.slots.head
        weight, bias = imprint_rows(means, features.mean(dim=0), head, first_new, features)
        head.weight[labels] = weight.to(head.weight.dtype)
        if head.bias is not None:
            head.bias[labels] = bias.to(head.bias.dtype)

    def _head_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The features the head reads for these rows (eval mode: no dropout)."""
        captured: list[torch.Tensor] = []
        hook = self.slots.head.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
        was_training = self.model.training
        self.model.eval()
        try:
            with self.autocast():
                self.model(input_ids=input_ids, attention_mask=attention_mask)
        finally:
            hook.remove()
            self.model.train(was_training)
        return captured[-1]

    @property
    def anchored(self) -> bool:
        """Whether a regulariser against forgetting is on (L2, EWC or LwF), so that an anchor is wanted."""
        return self.forgetting.wanted

    def anchor_to(self, state: AdapterState | None) -> None:
        """Pull later steps toward ``state``, the version now serving (see ``dynft.forgetting``).

        The L2 penalty is ``anchor_weight / 2 * ||w - w_anchor||^2`` over the adapter weights and the
        head rows of the anchor's labels (rows of labels that appear later are free); EWC weighs the
        same squares by a Fisher estimate made here, at each promotion; LwF keeps ``state`` to
        distil its outputs on replayed events. ``None`` removes the anchor. The state is checked
        against the model before anything changes. Called on the training thread.
        """
        self.forgetting.anchor_to(state)


def compile_model(model: nn.Module, backend: str) -> Any:
    """``model`` under ``torch.compile`` (compiled at its first call); an unknown backend is a ConfigError."""
    try:
        return torch.compile(model, backend=backend)
    except RuntimeError as exc:  # torch._dynamo's InvalidBackend, raised here rather than at the first step
        raise ConfigError(f"trainer.compile_backend {backend!r}: {exc}") from exc


def build_trainer(
    model_settings: ModelSettings, adapter_settings: AdapterSettings, trainer_settings: TrainerSettings
) -> OnlineTrainer:
    """Load the base model and tokenizer offline and wrap them in a fresh trainer."""
    path = resolve_model_path(model_settings.path)
    device = pick_device(model_settings.device)
    torch.manual_seed(trainer_settings.seed)
    tokenizer = load_tokenizer(path)
    pooling = resolve_pooling(path, model_settings.pooling)
    config = peft_config_from_settings(adapter_settings, path)
    model = build_model(path, config, 1, device, tokenizer.pad_token_id, pooling, model_settings)
    log.info(size_line(model, path))
    label_map = LabelMap(capacity=trainer_settings.max_labels)
    compute = autocast_dtype(model_settings.autocast, device, base_dtype(model_settings.dtype, device))
    pad_multiple = pad_multiple_for(trainer_settings.pad_multiple, compute, trainer_settings.compile)
    virtual = adapter_settings.num_virtual_tokens if adapter_settings.method == "prompt" else 0
    max_length = token_limit(path, model_settings.max_length, virtual, tell=True)
    collator = Collator(tokenizer, max_length, label_map, device.type == "cuda", pad_multiple)
    return OnlineTrainer(model, collator, trainer_settings, device, path, pooling, compute)
