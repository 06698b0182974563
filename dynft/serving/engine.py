"""The inference engine: micro-batched predictions and hot swaps that never block a request.

One *worker* thread runs every forward pass. Requests queue up whole (``dynft.serving.requests``:
a request's texts always share a batch, so they always share a version) and are grouped into
micro-batches of up to ``max_batch`` texts, waiting at most ``max_wait_ms`` for company.

A *watcher* thread follows the registry's serving pointer. When it moves, the watcher loads
the version off the request path: reads and hash-checks the files, checks every tensor's
shape and finiteness against the model, and stages device-resident copies. A serving version
that cannot be loaded is stood in for by the newest loadable one of the pointer's history. The worker then
installs the staged version between two batches by swapping parameter references (a few
dictionary writes). A batch runs entirely on the version it started with; no request waits
for a load, and a version that fails a check is never installed.

Many tasks (``dynft.tasks``): each task has a *lane*, its registry and the versions serving and
staged for it, found by the watcher under ``<registry>/tasks/``. A micro-batch may mix tasks:
one forward pass runs the whole batch, each row with its task's adapter and head
(``dynft.serving.mixed``); where that cannot be done, the worker groups its rows by task and
runs each group with that task's adapter and head, installed by reference before its pass.
A task's swap only changes its lane, so it never blocks, nor changes the answers of, another task.

The fast path (``dynft.serving.prototypes``, ``server.prototypes``): the default task's answers
gain prototype rows for the labels the answering version lacks, computed by the worker with that
same version, so a request still sees one version and one set of prototypes. Before the first
version, a version 0 (the base encoder, prototype rows only) answers once shots have arrived.
While it has labels to add, the default task's rows take a pass of their own, outside the mixed one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import torch
from transformers import PreTrainedTokenizerBase

from dynft.batching import pad_multiple_for, tokenize
from dynft.families import base_dtype, read_positions, token_limit
from dynft.fingerprint import BaseModelId
from dynft.freshness import served_after
from dynft.lexical import blend
from dynft.metrics import ServerMetrics
from dynft.model import (
    load_tokenizer,
    pick_device,
    resolve_model_path,
    resolve_pooling,
)
from dynft.precision import autocast, autocast_dtype
from dynft.registry import AdapterRegistry
from dynft.serving.answers import Answer, NotReady, Pending, Prediction, UnknownTask
from dynft.serving.mixed import MixedAnswers, MixedForward
from dynft.serving.prototypes import SHOTS_FILE, FastPath, merge_columns
from dynft.serving.requests import RequestQueue
from dynft.serving.watcher import Lane, LoadedVersion, VersionWatcher
from dynft.settings import Settings
from dynft.tasks import DEFAULT_TASK

log = logging.getLogger(__name__)
NOT_READY_AFTER = 3  # the worker's rounds failed in a row before /readyz says not ready


class InferenceEngine(VersionWatcher, MixedAnswers):
    def __init__(self, settings: Settings, registry: AdapterRegistry, metrics: ServerMetrics) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.model_path = resolve_model_path(settings.model.path)
        self.pooling = resolve_pooling(self.model_path, settings.model.pooling)
        self.base_model = BaseModelId.of(self.model_path, self.pooling)
        self.fingerprint = self.base_model.fingerprint
        self.device = pick_device(settings.model.device)
        # The same precision as the trainer's, so the gate judged what is answered here.
        self.compute_dtype = autocast_dtype(
            settings.model.autocast, self.device, base_dtype(settings.model.dtype, self.device)
        )
        t = settings.trainer  # padded lengths as the trainer's, for the same reason (and the same numbers)
        self.pad_multiple = pad_multiple_for(t.pad_multiple, self.compute_dtype, t.compile)
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(self.model_path)
        a = settings.adapter  # texts cut where the trainer cuts them (its log says so)
        self.max_length = token_limit(
            self.model_path, settings.model.max_length, a.num_virtual_tokens if a.method == "prompt" else 0
        )
        self.lanes: dict[str, Lane] = {DEFAULT_TASK: Lane(DEFAULT_TASK, registry)}  # grown by the watcher
        # A replica's: each task's registry from its follower (admin decisions go to the pointer topic).
        self.task_registry: Callable[[str], AdapterRegistry] | None = None
        self._installed: LoadedVersion | None = None  # whose parameters the model holds now (worker thread)
        self._failed_rounds = 0  # the worker's rounds that failed in a row (worker thread; read by /readyz)
        self._failing: str | None = None  # the last of their errors (said once while it repeats)
        self._mixed: dict[int, MixedForward] = {}  # by id of the slots it hooks (worker thread)
        self.requests = RequestQueue(settings.server)
        self._cond = self.requests.cond  # the watcher wakes the worker through it for a swap
        self._stop = threading.Event()
        self._nudged = threading.Event()  # look at the registry now, not at the next poll interval
        self.started_at = time.time()  # freshness counts events that arrived since
        self._fresh_through = 0  # newest version whose freshness was observed (worker thread only)
        s = settings.server
        self.fast = FastPath(settings.state_dir / SHOTS_FILE, s.prototype_shots) if s.prototypes else None
        self._worker = threading.Thread(target=self._work, name="dynft-infer", daemon=True)
        self._watcher = threading.Thread(target=self._watch, name="dynft-watch", daemon=True)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._worker.start()
        self._watcher.start()

    def nudge(self) -> None:
        """Look at the serving pointer now (a replica's follower calls it after each change)."""
        self._nudged.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._nudged.set()
        with self._cond:
            self._cond.notify_all()
        for thread in (self._watcher, self._worker):
            if thread.is_alive():
                thread.join(timeout_s)
        for pending in self.requests.drain():
            if pending.future.set_running_or_notify_cancel():
                pending.future.set_exception(NotReady("the server is shutting down"))

    @property
    def active(self) -> LoadedVersion | None:
        """The default task's version answering now."""
        return self.lanes[DEFAULT_TASK].active

    @property
    def _staged(self) -> LoadedVersion | None:
        return self.lanes[DEFAULT_TASK].staged

    @property
    def fallback_from(self) -> int | None:
        return self.lanes[DEFAULT_TASK].fallback_from

    @property
    def ready(self) -> bool:
        """Some task's version answers (``/readyz``), and the worker's rounds do not keep failing."""
        return bool(self.serving) and self._failed_rounds < NOT_READY_AFTER

    @property
    def serving(self) -> dict[str, int]:
        """The version answering for each task that has one (version 0, the cold start's prototypes
        alone, is not one); empty while the worker is not running: the server is not ready then."""
        if not self._worker.is_alive():
            return {}
        lanes = list(self.lanes.items())  # the watcher may add a lane meanwhile
        active = [(name, lane.active) for name, lane in lanes]
        return {name: loaded.version for name, loaded in active if loaded is not None and loaded.version > 0}

    # -- requests ------------------------------------------------------------------------

    def submit(self, texts: list[str], task: str = DEFAULT_TASK) -> Future[Answer]:
        """Queue a request; the future resolves with every text predicted by one version of ``task``."""
        future: Future[Answer] = Future()
        lane = self.lanes.get(task)
        if lane is None:
            raise UnknownTask(f"unknown task {task!r}; known tasks: {', '.join(sorted(self.lanes))}")
        if lane.active is None and lane.staged is None:
            which = "" if task == DEFAULT_TASK else f" for task {task}"
            why = " (its serving pointer cannot be read; the server's log says why)" if lane.unreadable else ""
            raise NotReady(f"no adapter version is serving yet{which}{why}")
        self.requests.put(Pending(texts, future, task))
        return future

    def _work(self) -> None:
        while not self._stop.is_set():
            # A request whose client gave up (timeout) was cancelled: skip it. Marking the rest
            # running means they can no longer be cancelled, so setting their result cannot fail.
            batch = [p for p in self.requests.collect() if p.future.set_running_or_notify_cancel()]
            try:
                self._install_staged()
                started = time.perf_counter()  # the forward passes alone: the worker's throughput
                self._serve(batch)
            except Exception as exc:  # a dead worker answers nobody while the server looks up: go on
                self._round_failed(exc, batch)
            else:
                if batch and self._failed_rounds:  # an idle round that passed proves nothing about requests
                    log.info("the inference worker answers again after %d failed round(s)", self._failed_rounds)
                if batch:
                    self._failed_rounds, self._failing = 0, None
                self.requests.measure(sum(len(p.texts) for p in batch), time.perf_counter() - started)

    def _round_failed(self, exc: Exception, batch: list[Pending]) -> None:
        """A round failed unforeseen: its requests get the error now; said once while it repeats, and
        after ``NOT_READY_AFTER`` rounds in a row ``/readyz`` says the server is not ready."""
        said = f"{type(exc).__name__}: {exc}"
        if said != self._failing:
            log.exception("the inference worker failed on %d request(s); it goes on (said once)", len(batch))
        self._failing = said
        self._failed_rounds += 1
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(exc)
        self._stop.wait(0.1)  # a failure that repeats must not spin

    def _install_staged(self) -> None:
        """Install what was staged (the start of the worker's round)."""
        if self.fast is not None:
            self.fast.take()
        for lane in list(self.lanes.values()):
            staged = lane.staged
            if staged is not None:
                try:
                    self._install(staged)
                finally:
                    if lane.staged is staged:  # one that cannot be installed is not tried again every round
                        lane.staged = None

    def _serve(self, batch: list[Pending]) -> None:
        """Answer ``batch`` with what is installed (the worker's one round)."""
        groups: dict[str, list[Pending]] = {}
        for pending in batch:
            groups.setdefault(pending.task, []).append(pending)
        # One pass for the tasks together, each row with its task's adapter; while the fast path
        # has prototype rows to add, the default task's rows need a pass of their own (their
        # features, its version's head).
        mixable = {t: g for t, g in groups.items() if t != DEFAULT_TASK or not self._fast_pending()}
        if len(mixable) > 1 and self._answer_mixed(mixable):
            groups = {t: g for t, g in groups.items() if t not in mixable}
        for task, group in groups.items():  # else one forward pass per task, each with its own adapter
            active = self.lanes[task].active
            if active is None:
                for pending in group:
                    pending.future.set_exception(NotReady("no adapter version is serving yet"))
                continue
            self._answer(active, group)

    def _fast_pending(self) -> bool:
        """Whether the fast path has labels to add to the default task's serving version."""
        active = self.lanes[DEFAULT_TASK].active
        return self.fast is not None and (
            active is None or bool(self.fast.pending(active.labels, active.label_events, active.lineage))
        )

    def _answer(self, active: LoadedVersion, batch: list[Pending]) -> None:
        try:
            answers, fast = self._forward(active, [t for p in batch for t in p.texts])
        except NotReady as exc:  # version 0 without shots (they were reset): nothing can answer
            for pending in batch:
                pending.future.set_exception(exc)
            return
        except Exception as exc:  # a failed batch fails its requests, not the server
            if len(batch) > 1:  # and one bad request must not fail the others that shared its batch
                for pending in batch:
                    self._answer(active, [pending])
                return
            log.exception("inference failed on a request of %d texts", len(batch[0].texts))
            batch[0].future.set_exception(exc)
            return
        start = 0
        for pending in batch:
            end = start + len(pending.texts)
            pending.future.set_result(Answer(answers[start:end], active.version, fast))
            start = end

    @torch.no_grad()
    def _forward(self, active: LoadedVersion, texts: list[str]) -> tuple[list[Prediction], bool]:
        """Predictions for ``texts`` by ``active``, and whether the fast path's rows took part."""
        self.metrics.batch_size.observe(len(texts))
        fast = self.fast if active.task == DEFAULT_TASK else None
        features, logits = self._run(active, texts, features=fast is not None)
        labels, used = active.labels, False
        logits = logits.float()[:, : len(labels)]  # (B, C)
        if fast is not None and features is not None:
            extra, more = fast.extend(
                active,
                labels,
                active.slots.head,
                features,
                lambda t: self._embed(active, t),
                active.label_events,
                active.lineage,
            )
            fast.observe(features)
            if more is not None:  # (B, P): one column per label the version lacks or barely knows
                labels, logits = merge_columns(labels, logits, extra, more)
                self.metrics.fast_path_answers.inc(len(texts))
                used = True
        if not labels:
            raise NotReady("no adapter version is serving yet")
        probs = torch.softmax(logits, dim=-1).cpu()
        if active.words is not None and not used:  # with prototype rows the version's own labels are not all
            probs = blend(probs, active.words.probabilities(texts), active.words.weight)
        out = []
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            out.append(Prediction(labels[best], dict(zip(labels, row, strict=True))))
        return out, used

    def _run(
        self, active: LoadedVersion, texts: list[str], features: bool = False
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One forward pass: the features the head reads (B, H) when asked for, and the logits."""
        enc = tokenize(self.tokenizer, texts, self.max_length, self.pad_multiple)  # as the trainer does
        ids = enc["input_ids"].to(self.device)
        mask = enc["attention_mask"].to(self.device)
        if self._installed is not active:  # another task's rows ran last: its adapter and head go out
            active.slots.install(active.params)
            self._installed = active
        captured: list[torch.Tensor] = []
        hook = (
            active.slots.head.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
            if features
            else None
        )
        try:
            with autocast(self.device, self.compute_dtype):
                logits = active.model(input_ids=ids, attention_mask=mask).logits
        finally:
            if hook is not None:
                hook.remove()
        if not captured:
            return None, logits
        head_input = captured[-1].float()
        if head_input.dim() == 3:  # a decoder's score reads every position, then keeps the last token's
            head_input = read_positions(head_input, ids, active.model.config.pad_token_id)
        return head_input, logits

    def _embed(self, active: LoadedVersion, texts: list[str]) -> torch.Tensor:
        """The features ``active``'s head reads for ``texts`` (B, H), in micro-batches."""
        size = self.settings.server.max_batch
        rows = [self._run(active, texts[i : i + size], features=True)[0] for i in range(0, len(texts), size)]
        return torch.cat([r for r in rows if r is not None])

    # -- swaps ---------------------------------------------------------------------------

    def _install(self, staged: LoadedVersion) -> None:
        """Runs on the worker thread between batches: the flip itself."""
        started = time.perf_counter()
        self._installed = None  # until the install is whole: a failed one is installed again by the next pass
        staged.slots.install(staged.params)  # the model stays in eval mode from _build: no module walk here
        self._installed = staged
        lane = self.lanes[staged.task]
        lane.active = staged
        if lane.staged is staged:
            lane.staged = None
        if staged.version:  # version 0 (the cold start's base encoder) is no adapter version swapped in
            self.metrics.swap_seconds.observe(time.perf_counter() - started)
            self.metrics.swaps.inc()
        self.metrics.task_serving_version.labels(staged.task).set(staged.version)
        if staged.task != DEFAULT_TASK:
            log.info("task %s: now serving version %d", staged.task, staged.version)
            return
        self.metrics.serving_version.set(staged.version)
        log.info("now serving version %d", staged.version)
        self._observe_freshness(staged)

    def _observe_freshness(self, staged: LoadedVersion) -> None:
        """Each event first served by ``staged`` waited from its arrival until now; once per
        version, and not for a rollback to an older one (its events were served before)."""
        if staged.version <= self._fresh_through:
            return
        self._fresh_through = staged.version
        now = time.time()
        for seconds in served_after(staged.arrivals, now, self.started_at):
            self.metrics.freshness_seconds.observe(seconds)
