"""The watcher's side of the inference engine: each task's lane, and the versions it loads.

The watcher thread follows every task's serving pointer (``poll_registry``), reads, checks and
stages the version it names (``load``: hash, base model, shapes, finiteness, device copy, all
off the request path), and leaves it in the lane's ``staged`` slot for the worker thread to
flip (``InferenceEngine._install``). A version that cannot be loaded is refused, counted and
retried every 30 s, and the newest loadable version of the pointer's history answers meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from dynft.errors import (
    AdapterMismatchError,
    BaseModelMismatchError,
    DynftError,
    PointerUnreadableError,
    VersionUnloadableError,
)
from dynft.fingerprint import BaseModelId, Pooling
from dynft.lexical import WordScorer
from dynft.metrics import ServerMetrics
from dynft.model import AdapterSlots, build_model, peft_config_from_dict, peft_config_from_settings, structure_key
from dynft.registry import AdapterRegistry, AdapterState
from dynft.serving.prototypes import FastPath
from dynft.settings import Settings
from dynft.tasks import DEFAULT_TASK, known_tasks, task_registry_dir

log = logging.getLogger("dynft.serving.engine")  # the engine's log: operators read one logger for the server


@dataclass(frozen=True)
class LoadedVersion:
    """A version ready to install: checked, device-resident parameters for one model."""

    version: int
    labels: list[str]
    params: dict[str, nn.Parameter]
    model: PeftModel
    slots: AdapterSlots
    loaded_at: float = field(default_factory=time.time)
    arrivals: Any = None  # meta.json's "arrivals": when the events it first serves arrived (dynft.freshness)
    label_events: Any = None  # meta.json's "label_events": fresh events trained per label (the fast path)
    task: str = DEFAULT_TASK
    lineage: Any = None  # meta.json's "lineage" (the fast path: shots of a newer one outrank its rows)
    words: WordScorer | None = None  # its word counts, blended into its answers (dynft.lexical)


@dataclass
class Lane:
    """One task in the server: its registry, the version answering and the one staged to replace it.

    ``staged`` is written by the watcher and taken by the worker (under the engine's condition);
    ``active`` is written by the worker only.
    """

    task: str
    registry: AdapterRegistry
    active: LoadedVersion | None = None
    staged: LoadedVersion | None = None
    failed: dict[int, float] = field(default_factory=dict)  # version -> when it failed (not retried for a while)
    fallback_from: int | None = None  # the unloadable serving version; written by the watcher only
    refused: dict[int, str] = field(default_factory=dict)  # version -> "unreadable" / "mismatch" (watcher only)
    unreadable: bool = False  # serving.json cannot be read now (watcher only; requests read it)


class VersionWatcher:
    """Loading and staging versions, mixed into ``InferenceEngine``, which sets these fields."""

    settings: Settings
    registry: AdapterRegistry
    metrics: ServerMetrics
    model_path: Path
    pooling: Pooling
    base_model: BaseModelId
    device: torch.device
    tokenizer: PreTrainedTokenizerBase
    lanes: dict[str, Lane]  # replaced whole (copy on write) by the watcher when a task appears
    task_registry: Callable[[str], AdapterRegistry] | None
    fast: FastPath | None
    _cond: threading.Condition
    _stop: threading.Event
    _nudged: threading.Event

    def _watch(self) -> None:
        failing: str | None = None  # the failure said last: a damaged file is said once, not every poll
        while not self._stop.is_set():
            self._nudged.clear()  # before reading, so a change made during the read is not missed
            try:
                self._poll_once()
            except Exception as exc:  # the watcher must outlive any one bad version or read
                said = f"{type(exc).__name__}: {exc}"
                if said != failing and isinstance(exc, DynftError):  # foreseen: its message says it all
                    log.error("watching the registry failed: %s (said once; retried)", exc)
                elif said != failing:
                    log.exception("watching the registry failed (said once; retried)")
                failing = said
            else:
                if failing is not None:
                    log.info("watching the registry works again")
                failing = None
            self._nudged.wait(self.settings.server.poll_interval_s)

    def _poll_once(self) -> None:
        """One look at every lane, then the fast path, which a failed lane does not keep from its look."""
        failure: Exception | None = None
        try:
            self.poll_registry()
        except Exception as exc:
            failure = exc
        if self.fast is not None:
            self.fast.poll()
            self._stage_base()
        if failure is not None:
            raise failure

    def poll_registry(self) -> None:
        """Stage each task's serving version if it changed (called by the watcher thread).

        If the serving version cannot be loaded (files missing or corrupt, another shape or base
        model), the newest loadable version of the pointer's history serves instead, with a
        warning and ``dynft_serving_fallback`` at 1; the serving version is tried again every 30 s.
        A lane that fails (a damaged ``serving.json``, say) keeps no other task from its version:
        every lane is looked at, then the first failure is raised.
        """
        failures = []
        for lane in self._lanes_now():
            try:
                self._poll_lane(lane)
                lane.unreadable = False
            except Exception as exc:
                lane.unreadable = isinstance(exc, PointerUnreadableError)  # told to requests that find no version
                failures.append(exc)
        if failures:
            raise failures[0]

    def _lanes_now(self) -> list[Lane]:
        """Every lane, with a lane made for each task that appeared in the registry since."""
        for task in known_tasks(self.registry.root):
            if task not in self.lanes:
                root = task_registry_dir(self.registry.root, task)
                s = self.settings.registry
                made = self.task_registry(task) if self.task_registry is not None else None
                self.lanes = {
                    **self.lanes,
                    task: Lane(task, made or AdapterRegistry(root, s.keep_last, s.keep_serving_history)),
                }
        return list(self.lanes.values())

    def _poll_lane(self, lane: Lane) -> None:
        pointer = lane.registry.serving()
        if pointer.version is None:
            return
        current = lane.staged or lane.active
        history = [h.get("version") for h in pointer.history]
        for version in dict.fromkeys([pointer.version, *history]):  # newest first, each once
            if not isinstance(version, int):
                continue
            if current is not None and current.version == version:
                self._note_fallback(lane, pointer.version, version)
                return
            if time.monotonic() - lane.failed.get(version, -1e9) < 30.0:
                continue
            staged = self._try_load(version, lane.task)
            if staged is not None:
                with self._cond:
                    lane.staged = staged
                    self._cond.notify_all()
                self._note_fallback(lane, pointer.version, version)
                return

    def _stage_base(self) -> None:
        """Cold start: once shots arrived and no version is here, stage version 0 (watcher thread).

        The base encoder with a fresh adapter (LoRA's starts as the identity) answers with the
        fast path's prototype rows alone, where it answered 503 before. Its model is the one the
        first version then loads into, when their structures match.
        """
        lane = self.lanes[DEFAULT_TASK]
        if self.fast is None or not self.fast.has_shots or lane.active is not None or lane.staged is not None:
            return
        model, slots = self._build(peft_config_from_settings(self.settings.adapter, self.model_path), 1)
        with self._cond:
            if lane.active is None and lane.staged is None:
                lane.staged = LoadedVersion(0, [], slots.capture(), model, slots)
                self._cond.notify_all()
        log.info("no version serves yet: version 0 (the base encoder) answers from prototypes")

    def _try_load(self, version: int, task: str = DEFAULT_TASK) -> LoadedVersion | None:
        started = time.perf_counter()
        try:
            staged = self.load(version, task)
        except DynftError as exc:
            self.lanes[task].failed[version] = time.monotonic()
            reason = "mismatch" if isinstance(exc, AdapterMismatchError) else "unreadable"
            self.lanes[task].refused[version] = reason  # the metric's label, not the message: /v1/adapters is public
            self.metrics.swap_failures.labels(reason).inc()
            log.error("cannot load version %d%s: %s", version, "" if task == DEFAULT_TASK else f" of task {task}", exc)
            return None
        self.metrics.swap_load_seconds.observe(time.perf_counter() - started)
        self.lanes[task].refused.pop(version, None)
        return staged

    def _note_fallback(self, lane: Lane, target: int, version: int) -> None:
        """Record whether ``version``, now serving or staged, stands in for an unloadable ``target``."""
        fallback = target if version != target else None
        if fallback is not None and lane.fallback_from != fallback:
            log.warning("serving version %d cannot be loaded; answering with version %d instead", target, version)
        elif fallback is None and lane.fallback_from is not None:
            log.info("serving version %d loaded; the fallback is over", target)
        lane.fallback_from = fallback
        if lane.task == DEFAULT_TASK:
            self.metrics.serving_fallback.set(0 if fallback is None else 1)

    def load(self, version: int, task: str = DEFAULT_TASK) -> LoadedVersion:
        """Read, check and stage ``version`` of ``task`` (never touches what serves)."""
        state, meta = self.lanes[task].registry.load(version)
        if not self.base_model.accepts(meta.get("base_model")):
            raise BaseModelMismatchError(f"version {version} was trained on another base model")
        key = structure_key(state.peft_config)
        loaded = [v for lane in list(self.lanes.values()) for v in (lane.staged, lane.active) if v is not None]
        same = [v for v in loaded if v.slots.structure == key]  # one base model for all tasks
        if same:
            model, slots = same[0].model, same[0].slots
        else:
            model, slots = self._build(peft_config_from_dict(state.peft_config), len(state.labels))
        words = self._words(version, state)
        non_blocking = self.device.type == "cuda"
        params = slots.prepare(state, non_blocking=non_blocking)
        if non_blocking:
            torch.cuda.synchronize(self.device)
        return LoadedVersion(
            version,
            list(state.labels),
            params,
            model,
            slots,
            arrivals=meta.get("arrivals"),
            task=task,
            label_events=meta.get("label_events"),
            lineage=meta.get("lineage"),
            words=words,
        )

    def _words(self, version: int, state: AdapterState) -> WordScorer | None:
        """The version's word counts, ready to blend; None where it has none or the blend is off."""
        if not self.settings.trainer.lexical_blend:
            return None
        try:
            return state.word_scorer()
        except ValueError as exc:
            raise VersionUnloadableError(f"adapter version {version}: {exc}") from exc

    def _build(self, config: PeftConfig, num_labels: int) -> tuple[PeftModel, AdapterSlots]:
        pad = self.tokenizer.pad_token_id
        model = build_model(self.model_path, config, num_labels, self.device, pad, self.pooling, self.settings.model)
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        return model, AdapterSlots(model)
