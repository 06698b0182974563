"""Publishing: how to cut a version, judge it, and record the decision.

When one is due (``dynft.schedule``), the live adapter is exported, scored on the held-out
window (``dynft.scoring``; a fresh version on the window's newest events), published with the
verdict in its metadata, and promoted if the gate says so. Each version records when the events
it first serves arrived (``dynft.freshness``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from dynft.errors import AdapterMismatchError, BaseModelMismatchError, DynftError, RegistryError
from dynft.evaluation import HoldoutWindow
from dynft.events import DEFAULT_TASK, Event
from dynft.fingerprint import BaseModelId
from dynft.freshness import Arrivals
from dynft.gate import Decision, judge
from dynft.metrics import TrainerMetrics
from dynft.model import AdapterState
from dynft.rank import convert_lora_rank
from dynft.registry import AdapterRegistry
from dynft.replication.feed import TaskFeed, Term, VersionsFeed, open_feed
from dynft.schedule import Schedule
from dynft.scoring import Scorer, Scores, SinceServing
from dynft.settings import Settings
from dynft.trainer import OnlineTrainer

log = logging.getLogger(__name__)


class Publisher:
    def __init__(
        self,
        registry: AdapterRegistry,
        trainer: OnlineTrainer,
        holdout: HoldoutWindow,
        settings: Settings,
        metrics: TrainerMetrics,
        feed: TaskFeed | None = None,
        term: Term | None = None,
        task: str = DEFAULT_TASK,
    ) -> None:
        """``feed``: a task's share of the trainer's versions feed; else the feed is opened here (if
        configured), under ``term``'s epoch and fenced by it when trainers are elected. ``task``
        names the task in its log lines (the default task's name none)."""
        self.task = task
        self.log = logging.LoggerAdapter(log) if task == DEFAULT_TASK else TaskLog(log, {"task": task})
        self.registry = registry
        self.trainer = trainer
        self.holdout = holdout
        self.settings = settings
        self.metrics = metrics
        path = trainer.base_model_path
        self.base = BaseModelId.of(path, trainer.pooling) if path is not None else None
        self.fingerprint = self.base.fingerprint if self.base is not None else "unknown"
        self.gate_off = settings.evaluation.holdout_fraction == 0
        if self.gate_off:
            self.log.warning(
                "evaluation.holdout_fraction = 0: nothing is held out, so the promotion gate is off and every "
                "finite candidate is promoted (unless an operator pinned the serving version)"
            )
        self.lineage = 1  # written by the training thread; the batching thread reads it (one int) for shots
        self.latest_version: int | None = None
        self.serving_version: int | None = None
        self.schedule = Schedule(settings.registry)  # when a version is due (training thread only)
        self._promoted: int | None = None  # the version this publisher promoted last
        self._loadable: tuple[int, Any] | None = None  # the serving version last read whole, and its files' stamp
        self._scores: Scores | None = None  # the last check's
        # kafka.versions_topic: replicas follow what is published here
        self.feed: VersionsFeed | TaskFeed | None = feed
        if feed is None:
            self.feed = open_feed(settings, registry, term)
        self.sent_step = trainer.steps  # the trainer's steps in the newest version on the versions topic
        self._version_step = trainer.steps  # the trainer's steps in the newest version published
        self.arrivals = Arrivals()  # events trained since the last promotion (training thread only)
        # Fresh events trained per label in this lineage; versions record it, so that the server's
        # fast path can keep answering a label from its prototype while a version barely knows it.
        self.label_events: Counter[str] = Counter()
        # Steps that count toward the publishing schedule: the trainer's own, or (tasks.sharing =
        # shared) every task's, since any task's step moves the adapter this one publishes.
        self.clock: Callable[[], int] = lambda: self.trainer.steps
        self.scorer = Scorer(trainer, settings, lambda: self.clock())
        self.since = SinceServing(4 * settings.gate.min_holdout)  # judges while too little is held out
        # Whether training work waits (publishing now would delay it); set by the training loop.
        self.waiting: Callable[[], bool] = lambda: False

    def trained(self, arrived: float, events: Sequence[Event], predictions: Sequence[str | None] | None = None) -> None:
        """``events``, fresh and arrived at ``arrived``, were just trained (training thread);
        ``predictions``: the step's prequential answers to them (``SinceServing``)."""
        if predictions is not None:
            self.since.add(events, predictions)
        self.arrivals.add(arrived, len(events))
        self.schedule.trained(len(events))
        self.label_events.update(e.label for e in events)

    @property
    def on_topic(self) -> bool:
        """Whether every step trained so far is in a version on the versions topic."""
        return self.trainer.steps == self.sent_step

    def resume(self) -> None:
        """Continue from the newest published version if it fits this model and adapter configuration.

        If it does not, a new lineage starts (``start_lineage``): from the serving version if that
        fits, else from the base model.
        """
        versions = self.registry.versions()
        self.serving_version = self.registry.serving().version
        if not versions:
            return
        newest = versions[-1]
        self.latest_version = newest
        self._show_latest()
        try:
            state, meta = self._fitting(newest)
            self.trainer.load(state)
            self.label_events = Counter(meta.get("label_events") or {})
        except RegistryError as exc:  # AdapterMismatchError included
            self.log.warning("not resuming from version %d (%s); starting a new lineage", newest, exc)
            self.start_lineage([])
            return
        self.lineage = int(meta.get("lineage", 1))
        self.sent_step = self._version_step = self.trainer.steps
        self.log.info("resumed from version %d (lineage %d, %d labels)", newest, self.lineage, len(state.labels))
        self.reanchor((state, meta) if newest == self.serving_version else None)

    def _fitting(self, version: int) -> tuple[AdapterState, dict[str, Any]]:
        """``version``'s state and metadata, if it loads and was trained on this base model."""
        state, meta = self.registry.load(version)
        if self.base is not None and not self.base.accepts(meta.get("base_model")):
            raise BaseModelMismatchError(f"version {version} was trained on another base model")
        return state, meta

    def _meta_of(self, version: int | None) -> dict[str, Any]:
        try:
            return self.registry.meta(version) if version is not None else {}
        except RegistryError:
            return {}

    def new_lineage(self) -> None:
        self.lineage += 1
        self.label_events.clear()  # the head starts afresh (a retire) or the adapter does
        self.since.clear()  # the old concept's events would judge the new lineage's candidates

    def check_checkpoint(self, state: dict[str, Any]) -> None:
        """Raise ``BaseModelMismatchError`` if a checkpoint's publisher state was written for another base model."""
        recorded = state.get("base_model")
        if self.base is not None and not self.base.accepts(recorded):
            raise BaseModelMismatchError(f"the base model changed: {recorded} -> {self.fingerprint}")

    def start_lineage(self, labels: list[str], previous_lineage: int = 0) -> None:
        """Start a new lineage when the checkpoint or newest version no longer fits the configuration.

        The trainer (unchanged since it was built) starts from the serving version if that fits
        the model, else from the base model; ``labels`` (the checkpoint's label map) are kept,
        after the serving version's. Versions are numbered on from the registry's newest.
        """
        self.serving_version = self.registry.serving().version
        self.latest_version = max(self.registry.versions(), default=0) or None
        self.lineage = max(previous_lineage, int(self._meta_of(self.latest_version).get("lineage", 0))) + 1
        self.schedule.at_step = self.clock()
        self.label_events.clear()
        self.since.clear()  # the old lineage's answers do not speak for the new one
        origin = self._start_from_serving()
        self.trainer.label_map.ids(labels)
        self.log.info(
            "lineage %d starts from %s with %d labels",
            self.lineage,
            "the base model" if origin is None else f"serving version {origin}",
            len(self.trainer.label_map),
        )

    def _start_from_serving(self) -> int | None:
        version = self.serving_version
        if version is None:
            return None
        try:
            state, meta = self._fitting(version)
            self.label_events = Counter(meta.get("label_events") or {})  # its head's rows come along
            try:
                self.trainer.load(state)
            except AdapterMismatchError:  # another LoRA rank: carried over (exactly, or its best approximation)
                state = convert_lora_rank(state, self.trainer.slots)
                self.trainer.load(state)
        except RegistryError as exc:
            self.log.info("serving version %d cannot start the new lineage (%s)", version, exc)
            return None
        if self.trainer.anchored:
            self.trainer.anchor_to(state)  # what serves is where the new lineage starts; stay close to it
        return version

    def serving_now(self) -> int | None:
        """The serving version as ``serving.json`` says now, for status lines and the console (an
        operator may have promoted or rolled back since the last publish); the last known one where
        it cannot be read."""
        try:
            return self.registry.serving().version
        except RegistryError:
            return self.serving_version

    def snapshot(self) -> dict[str, Any]:
        return {
            "lineage": self.lineage,
            "latest_version": self.latest_version,
            "published_at_step": self.schedule.at_step,
            "publish_failed": self.schedule.retry.failures > 0,  # tried again after a restart too
            "base_model": self.fingerprint,  # a restart on another base model starts a new lineage
            "label_events": dict(self.label_events),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.lineage, self.schedule.at_step = state["lineage"], state["published_at_step"]
        if state.get("publish_failed"):
            self.schedule.failed()
        self.label_events = Counter(state.get("label_events") or {})
        self.latest_version = max(state["latest_version"] or 0, max(self.registry.versions(), default=0)) or None
        self._show_latest()
        self.serving_version = self.registry.serving().version
        self.reanchor()

    def _show_latest(self) -> None:
        """The newest version's gauges from the start: after a restart they had no sample until a publish."""
        if self.latest_version is None:
            return
        if self.task == DEFAULT_TASK:
            self.metrics.latest_version.set(self.latest_version)
        self.metrics.task_latest_version.labels(self.task).set(self.latest_version)

    def reanchor(self, loaded: tuple[AdapterState, dict[str, Any]] | None = None) -> None:
        """After a restart, pull toward the serving version again: the anchor is not checkpointed.

        Only a serving version of this lineage and base model whose labels are a prefix of the
        trainer's can anchor (head rows are matched by position); otherwise the regulariser waits
        for the next promotion, as on a first start. ``loaded``: the serving version's state and
        metadata, when the caller has just read them.
        """
        version = self.serving_version
        if not self.trainer.anchored or version is None:
            return
        try:
            state, meta = loaded or self.registry.load(version)
            if meta.get("lineage") != self.lineage or (
                self.base is not None and not self.base.accepts(meta.get("base_model"))
            ):
                raise AdapterMismatchError("it belongs to another lineage or base model")
            if state.labels != self.trainer.exported_labels()[: len(state.labels)]:
                raise AdapterMismatchError("its labels are not a prefix of the trainer's")
            self.trainer.anchor_to(state)
        except (RegistryError, AdapterMismatchError) as exc:
            self.log.warning(
                "no regulariser anchor until the next promotion: serving version %d does not fit (%s)", version, exc
            )
            return
        self.log.info("regulariser anchored to serving version %d", version)

    def maybe_publish(self, extra_meta: dict[str, Any], force: bool = False) -> int | None:
        """Publish (and perhaps promote) a version when one is due; returns its number."""
        if not self.due(force):
            return None
        self.mark_published()
        started = time.monotonic()
        try:
            version = self._publish(extra_meta)
        except DynftError as exc:
            self.publish_failed()
            self.log.error("could not publish a version (tried again in a while): %s", exc)
            return None
        finally:
            self.schedule.cost = time.monotonic() - started
        self.schedule.succeeded()
        return version

    def due(self, force: bool = False) -> bool:
        """Whether a version is due now (``force``: whenever the trainer moved since the last one)."""
        labels = len(self.trainer.exported_labels())
        return self.schedule.due(self.clock(), labels, self.serving_version is not None, self.waiting, force)

    def mark_published(self) -> None:
        """Start the next publishing interval now."""
        self.schedule.mark(self.clock())

    def publish_failed(self) -> None:
        """The publish begun at ``mark_published`` did not finish: it is due again after a backoff."""
        if self.task == DEFAULT_TASK:
            self.metrics.publish_errors.inc()
        self.metrics.task_publish_errors.labels(self.task).inc()
        self.schedule.failed()

    def _publish(self, extra_meta: dict[str, Any]) -> int:
        state, decision = self.candidate()
        return self.record(state, decision, extra_meta)

    def candidate(self) -> tuple[AdapterState, Decision]:
        """The live adapter exported and judged against the serving version; nothing is written yet."""
        if not self.trainer.all_finite():
            raise RegistryError("the adapter has non-finite weights; nothing is published")
        state = self.trainer.export()
        return state, self._judge(len(state.labels))

    def record(self, state: AdapterState, decision: Decision, extra_meta: dict[str, Any]) -> int:
        """Publish ``state`` with ``decision`` in its metadata, and promote it if the decision says so."""
        decision = self._unless_pinned_meanwhile(decision)
        meta = {
            **extra_meta,
            "parent": self.latest_version,
            "lineage": self.lineage,
            "step": self.trainer.steps,
            "labels": len(state.labels),
            "base_model": self.fingerprint,
            "adapter_bytes": state.nbytes,
            "gate": decision.as_dict(),
        }
        if self.trainer.lexicon is not None:  # the adapter's share of the served blend (dynft.lexical)
            meta["lexical_weight"] = self.trainer.lexicon.weight
        meta["arrivals"] = self.arrivals.pairs()
        meta["label_events"] = dict(self.label_events)
        info = self.registry.publish(state, meta)
        self.latest_version = info.version
        self.schedule.published(len(state.labels))
        self._show_latest()
        if self.task == DEFAULT_TASK:  # the unlabelled series describe the default task (README)
            self.metrics.versions.labels(decision.label).inc()
        self.metrics.task_versions.labels(self.task, decision.label).inc()
        promoted = decision.promote and self.registry.promote(
            info.version, reason=f"gate: {decision.reason}", unless_pinned=True
        )
        if decision.promote and not promoted:
            self.log.warning(
                "version %d passed the gate, but an operator pinned the serving version meanwhile", info.version
            )
        if promoted:
            self.serving_version = info.version
            self.trainer.anchor_to(state)  # the regulariser (trainer.anchor_weight) pulls toward what serves
            self.scorer.promoted(info.version, state, self._scores)
            self._promoted = info.version
            self.arrivals.clear()  # served from now on; a rejected candidate's events wait for the next
            self.since.clear()
        else:
            self.registry.prune()
        self.metrics.task_serving_version.labels(self.task).set(self.serving_version or 0)
        self.log.info("version %d %s: %s", info.version, decision.label, decision.reason)
        self._version_step = self.trainer.steps
        if self.feed is not None:
            self._sync_feed(self.feed)
        return info.version

    def resync(self) -> bool:
        """Sync the versions feed again if its last sync failed and its retry is due (the loop's tick):
        a version withheld by a suspended term or an outage reaches the topic without a next publish.
        Returns whether it tried."""
        if self.feed is None or not self.feed.due():
            return False
        with contextlib.suppress(DynftError):  # a ConfigError (a version above the record limit), logged by the feed
            self._sync_feed(self.feed)
        return True

    def _sync_feed(self, feed: VersionsFeed | TaskFeed) -> None:
        feed.sync()
        if self.latest_version is not None and feed.sent(self.latest_version):
            self.sent_step = self._version_step

    def _unless_pinned_meanwhile(self, decision: Decision) -> Decision:
        """``decision``, or a rejection when an operator pinned the serving version while the gate judged:
        the version's metadata then says why it does not serve. (A pin made during the publish itself
        still wins, through ``promote(unless_pinned=True)``; the warning below tells that case.)"""
        if not decision.promote:
            return decision
        pointer = self.registry.serving()
        if not pointer.pinned:
            return decision
        why = f"passed the gate ({decision.reason}), but serving version {pointer.version} was pinned meanwhile"
        return replace(decision, promote=False, reason=why)

    def _judge(self, labels: int) -> Decision:
        pointer = self.registry.serving()
        self.serving_version = pointer.version
        holdout = self.holdout.snapshot()
        candidate = serving = None
        scores = self._scores = None
        unloadable = None if pointer.version is None or self.gate_off else self._why_unloadable(pointer.version)
        if unloadable is not None and pointer.pinned:
            self.log.warning(
                "serving version %d cannot be loaded (%s) but is pinned: waiting", pointer.version, unloadable
            )
        version = pointer.version if unloadable is None and not self.gate_off else None
        if version is not None and len(holdout) >= self.settings.gate.min_holdout:
            self.scorer.follows(version, self._promoted)
            scores = self._scores = self.scorer.check(holdout, version, lambda v: self._fitting(v)[0])
        elif version is not None and len(self.since) >= self.settings.gate.min_holdout:
            scores = self._since_scores(version)
        if scores is not None:
            candidate, serving = scores.candidate, scores.reference
            if self.task == DEFAULT_TASK:
                self.metrics.gate_accuracy.labels("candidate").set(candidate)
                self.metrics.gate_accuracy.labels("serving").set(serving)
        return judge(
            candidate,
            serving,
            scores.events if scores is not None else len(holdout),
            pointer.version,
            pointer.pinned,
            self.settings.gate,
            unloadable=unloadable,
            gate_off=self.gate_off,
            new_labels=max(0, labels - int(self._meta_of(pointer.version).get("labels", labels))),
            reference=self.scorer.reference if scores is not None and scores.scope != "prequential" else None,
            scope=scores.scope if scores is not None else "window",
        )

    def _since_scores(self, version: int) -> Scores | None:
        """The trainer's answers against ``version``'s on the events trained since it was cut;
        None when it cannot be scored with this model (another adapter configuration)."""
        try:
            return self.since.check(self.trainer, version, lambda v: self._fitting(v)[0])
        except RegistryError as exc:  # AdapterMismatchError included
            self.log.info("cannot judge on the events trained since version %d: %s", version, exc)
            return None

    def _why_unloadable(self, version: int) -> str | None:
        """Why the serving version cannot be scored (it cannot be loaded), or None if it can.

        Checked at every gate, even when its predictions are cached: the files may have gone bad
        since, and then the server cannot load it either. Reading an adapter costs milliseconds, so
        a version found loadable is read again only once its files changed (``registry.stamp``).
        """
        stamp = self.registry.stamp(version)
        if stamp is not None and self._loadable == (version, stamp):
            return None
        try:
            self._fitting(version)
        except AdapterMismatchError as exc:
            return str(exc) if isinstance(exc, BaseModelMismatchError) else None  # another shape: scored apart
        except RegistryError as exc:
            return str(exc)
        self._loadable = (version, stamp) if stamp is not None else None
        return None


class TaskLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Log lines of one task's publisher: ``task intents: version 5 promoted: ...``."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"task {self.extra['task'] if self.extra else '?'}: {msg}", kwargs
