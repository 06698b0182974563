"""Routing on the batching thread: every raw record is trained on, held out or dead-lettered.

Each record taken from the intake ends in exactly one of three places: the events to train on,
the held-out window, or the dead-letter sink with a reason. The rules come first (``decode``'s,
then the label cap ``trainer.max_labels``), so a record that breaks one gets that rule's reason.
An exception that no rule foresaw, raised for one record while it is decoded, hashed for the
hold-out or tokenized (to train on, or for the gate to score a held-out event), dead-letters
that record as ``internal``, with the exception's type in the detail, and the others go on: one
record never stops the trainer. Failures of the sink itself (a full disk, unreachable brokers)
are the environment's, not the record's, and are raised.

>>> import tempfile
>>> from pathlib import Path
>>> from prometheus_client import CollectorRegistry
>>> from dynft.deadletter import JsonlDeadLetterSink
>>> from dynft.metrics import TrainerMetrics
>>> from dynft.settings import Settings
>>> sink = JsonlDeadLetterSink(Path(tempfile.mkdtemp()) / "dead.jsonl", "doctest")
>>> router = Router(Settings(), LabelMap(capacity=1), sink, TrainerMetrics(CollectorRegistry()))
>>> raws = [b'{"id": "a", "text": "hi", "label": "x"}', b'{"id": "b", "text": "hi", "label": "y"}', b"{"]
>>> routed = router.route([Record(raw, "doctest", n) for n, raw in enumerate(raws, 1)])
>>> [e.id for _, e in routed.fresh], [key for _, key in routed.dead]
(['a'], ['b', '@doctest:3'])
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from dynft.batching import Batch, Collator, LabelMap
from dynft.deadletter import DeadLetterSink
from dynft.evaluation import is_held_out
from dynft.events import Event, Rejection, decode
from dynft.metrics import TrainerMetrics
from dynft.settings import Settings
from dynft.sources import Record
from dynft.tasks import TaskDirectory

log = logging.getLogger(__name__)


@dataclass
class Routed:
    """What became of one take of records; each record is in exactly one of the three lists."""

    fresh: list[tuple[Record, Event]] = field(default_factory=list)
    held_out: list[tuple[Record, Event]] = field(default_factory=list)
    dead: list[tuple[Record, str]] = field(default_factory=list)  # with its ledger key


def ledger_key(rejection: Rejection, record: Record) -> str:
    """A dead letter's ledger key: the record's id where it had a usable one, else its position."""
    return rejection.event_id or f"@{record.stream}:{record.next}"


class Router:
    """Sorts records and dead-letters the rejected ones; used by the batching thread only.

    The label map is shared with the trainer (behind its own lock); labels are admitted to it
    here, before the event is trained on or buffered, so the cap holds whatever happens later.
    """

    def __init__(
        self,
        settings: Settings,
        labels: LabelMap,
        sink: DeadLetterSink,
        metrics: TrainerMetrics,
        on_reject: Callable[[Rejection, Record], None] | None = None,
        tasks: TaskDirectory | None = None,
        partition_of: Callable[[str], int] | None = None,
    ) -> None:
        """``partition_of``: sharded trainers (``kafka.sharded``), the source partition of a task's events."""
        self.limits = settings.events
        self.partition_of = partition_of
        self.on_reject = on_reject  # the console's note of the latest dead letters
        self.holdout_fraction = settings.evaluation.holdout_fraction
        self.labels = labels
        self.tasks = tasks or TaskDirectory(labels, settings.tasks.max_tasks)  # each task's label map
        self.sink = sink
        self.metrics = metrics

    def route(self, records: Sequence[Record]) -> Routed:
        """Decode ``records``; dead-letter the bad ones, set the held-out share aside."""
        routed = Routed()
        for record in records:
            try:
                outcome = self._sort(record)
            except Exception as exc:  # what no rule foresaw: this record's fault, not the trainer's
                outcome = internal(exc, record.raw)
            if isinstance(outcome, Rejection):
                routed.dead.append((record, self.reject(outcome, record)))
            elif outcome[0]:
                routed.held_out.append((record, outcome[1]))
            else:
                routed.fresh.append((record, outcome[1]))
        return routed

    def _sort(self, record: Record) -> Rejection | tuple[bool, Event]:
        """A rejection, or whether the event is held out, and the event."""
        event = decode(record.raw, self.limits)
        if isinstance(event, Rejection):
            if event.reason == "record_too_large" and record.where and "bytes" in record.where:
                # The source cut the line: the decoder saw only its first bytes, the source knows its length.
                return replace(event, detail=f"{record.where['bytes']} bytes > {self.limits.max_record_bytes}")
            return event
        if self.partition_of is not None:
            wrong = wrong_partition(event, record, self.partition_of(event.task_name))
            if wrong is not None:
                return wrong
        labels = self.tasks.room(event.task_name)  # a new task is admitted below, with its first valid event
        if labels is None:
            return self._too_many_tasks(event, record)
        held_out = is_held_out(event.id, event.text, self.holdout_fraction)
        if not _fit(labels, event, held_out):
            return Rejection("too_many_labels", _over_capacity(event, labels, held_out), record.raw, event.id)
        entered = self.tasks.enter(event.task_name, labels)
        if entered is None:
            return self._too_many_tasks(event, record)
        if entered is not labels:  # admitted meanwhile by another thread: its own map takes the labels
            _fit(entered, event, held_out)
        return held_out, event

    def _too_many_tasks(self, event: Event, record: Record) -> Rejection:
        detail = (
            f"task {event.task_name!r} would be task {len(self.tasks) + 1}, the default task included "
            f"(tasks.max_tasks={self.tasks.max_tasks})"
        )
        return Rejection("too_many_tasks", detail, record.raw, event.id)

    def collate(
        self, collator: Collator, fresh: Sequence[tuple[Record, Event]], replayed: list[Event]
    ) -> tuple[Batch | None, list[tuple[Record, str]]]:
        """The batch of ``fresh`` then ``replayed`` events, and the fresh records dead-lettered on the way.

        Tokenizing is batched; when a batch fails, each fresh event is tokenized alone, and only
        those that fail are dead-lettered (as ``internal``). ``None`` when none is left.
        """
        events = [event for _, event in fresh]
        if not events and not replayed:  # nothing to tokenize (a tokenizer fails on an empty batch)
            return None, []
        try:
            return collator(events + replayed, n_fresh=len(events)), []
        except Exception:
            log.warning("tokenizing a batch failed; looking for the record(s) that caused it", exc_info=True)
        kept, dead = self._each(fresh, lambda event: collator([event], n_fresh=1))
        if not kept:
            return None, dead
        try:
            return collator(kept + replayed, n_fresh=len(kept)), dead
        except Exception:  # no single fresh event fails: the replayed ones are left out of this step
            return collator(kept, n_fresh=len(kept)), dead

    def screen(
        self, collator: Collator, held_out: Sequence[tuple[Record, Event]]
    ) -> tuple[list[Event], list[tuple[Record, str]]]:
        """The held-out events that tokenize, and the records dead-lettered for failing to.

        The gate tokenizes the held-out window at every candidate; one event there that fails
        would fail every gate for as long as the window (and the checkpoints) kept it.
        """
        events = [event for _, event in held_out]
        if not events:
            return [], []
        try:
            collator.encode([event.text for event in events])
            return events, []
        except Exception:
            log.warning("tokenizing held-out events failed; looking for the record(s) that caused it", exc_info=True)
        return self._each(held_out, lambda event: collator.encode([event.text]))

    def _each(
        self, pairs: Sequence[tuple[Record, Event]], attempt: Callable[[Event], object]
    ) -> tuple[list[Event], list[tuple[Record, str]]]:
        """``attempt`` on each event alone: those that fail are dead-lettered as ``internal``."""
        kept, dead = [], []
        for record, event in pairs:
            try:
                attempt(event)
            except Exception as exc:
                dead.append((record, self.reject(internal(exc, record.raw, event.id), record)))
            else:
                kept.append(event)
        return kept, dead

    def reject(self, rejection: Rejection, record: Record) -> str:
        """Write ``rejection`` to the dead-letter sink, count it; returns its ledger key."""
        self.sink.write(rejection, record)
        self.metrics.rejected.labels(rejection.reason).inc()
        if self.on_reject is not None:
            self.on_reject(rejection, record)
        return ledger_key(rejection, record)


def wrong_partition(event: Event, record: Record, partition: int) -> Rejection | None:
    """Sharded trainers train a task where its key sends it: an event on another partition would be
    trained by a second trainer, beside the task's own (a ``topic/partition`` stream is Kafka's)."""
    topic, _, came = record.stream.rpartition("/")
    if not came.isdigit() or int(came) == partition:
        return None
    detail = (
        f"task {event.task_name!r} belongs to partition {partition} of {topic} (its key); this event came on "
        f"partition {came}: produce sharded events with key = the task name"
    )
    return Rejection("wrong_partition", detail, record.raw, event.id)


def internal(exc: Exception, raw: bytes, event_id: str | None = None) -> Rejection:
    """The rejection of a record for an exception no rule foresaw; logged with its traceback."""
    log.warning("a record raised %s; dead-lettered as internal", type(exc).__name__, exc_info=exc)
    try:
        message = str(exc)
    except Exception:  # an exception whose message itself fails: its type still says what happened
        message = "(message unavailable)"
    return Rejection("internal", f"{type(exc).__name__}: {message}"[:1000], raw, event_id)


def _fit(labels: LabelMap, event: Event, held_out: bool) -> bool:
    """Whether ``labels`` takes the event's label and its teacher's, adding them unless it is held out.

    A held-out event never adds a label (it is not trained on), but one the map could not take is
    refused alike: the gate could never predict its label. Teacher labels grow the space too.
    """
    names = [event.label, *(event.teacher or ())]
    if held_out:
        return labels.fits_all(names)
    return labels.admit_all(names) if len(names) > 1 else labels.admit(event.label)


def _over_capacity(event: Event, labels: LabelMap, held_out: bool) -> str:
    """Why ``event`` cannot have its labels: which new ones it brings, and how many the map holds."""
    cap, known = labels.capacity, len(labels)
    brought = [event.label, *(event.teacher or ())]
    new = [label for label in dict.fromkeys(brought) if labels.get(label) is None]
    if len(new) == 1:
        return f"label {new[0][:64]!r} would be label {known + 1} (trainer.max_labels={cap})"
    named = ", ".join(repr(label[:32]) for label in new[:3]) + (", ..." if len(new) > 3 else "")
    return (
        f"the label and its teacher bring {len(new)} new labels ({named}): "
        f"{known} + {len(new)} > trainer.max_labels={cap}"
    )
