"""What the console shows of a training run, taken from the loop: ``HistoryRecorder`` makes each
status interval's ``Point`` and ``Snapshot`` (``dynft.history``, the files they are kept in) from
the loop's metrics, tasks, labels, dead letters and drift detections.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from dynft.durable import write_atomic
from dynft.events import DEFAULT_TASK, Rejection
from dynft.history import (
    CONSOLE_DIR,
    HISTORY_FILE,
    LATEST_DEAD,
    MAX_DRIFT,
    SNAPSHOT_FILE,
    TEXT_CHARS,
    DeadLetter,
    DriftMark,
    HistoryFile,
    LabelStat,
    PartitionLag,
    Point,
    Snapshot,
    TaskStat,
    read_snapshot,
)
from dynft.sources import Record

if TYPE_CHECKING:  # drift imports river and scikit-learn: seconds a serve-only process does not need
    from dynft.buffer import ReplayBuffer
    from dynft.drift import Detection
    from dynft.evaluation import Prequential
    from dynft.loop import TrainingLoop

log = logging.getLogger(__name__)


def _samples(registry: CollectorRegistry, name: str) -> list[tuple[dict[str, str], float]]:
    """The values of one metric family in ``registry``, with their labels."""
    return [(s.labels, s.value) for m in registry.collect() for s in m.samples if s.name == name]


def _place(record: Record) -> str:
    """Where a record without a usable id was: its line in a file (its byte offset after a restart
    mid-file, where the line number is not known), else its stream position."""
    where = record.where or {}
    line, offset = where.get("line"), where.get("offset")
    if isinstance(line, int):
        return f"line {line}"
    return f"byte {offset}" if isinstance(offset, int) else f"position {record.next}"


def dead_letter_of(rejection: Rejection, record: Record, show_text: bool, now: float) -> DeadLetter:
    """What the console shows of a rejected record: never a path, the text only when allowed.

    A rejected record can be anything (deep nesting, lone surrogates, huge numbers): nothing
    here may raise for it, so parsing is best-effort and every string is made encodable.
    """
    event_id = _safe(rejection.event_id[:64]) if rejection.event_id else _place(record)
    text = None
    if show_text:
        with contextlib.suppress(Exception):
            obj = json.loads(rejection.raw)
            if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                text = obj["text"]
        if text is None:
            text = rejection.raw[: TEXT_CHARS * 4].decode("utf-8", errors="replace")
        text = _safe(text[:TEXT_CHARS])
    # A rule's detail names fields, sizes and labels, never a text; an unforeseen exception's
    # message may quote its input, so it is kept as the text is, and its type otherwise.
    detail = rejection.detail if show_text or rejection.reason != "internal" else rejection.detail.split(":")[0]
    detail = _safe(detail[:TEXT_CHARS])
    return DeadLetter(t=now, id=event_id, reason=rejection.reason, detail=detail, text=text)


def _safe(value: str) -> str:
    """``value`` with lone surrogates written as escapes, so it can always be encoded as UTF-8."""
    return value if value.isascii() else value.encode("utf-8", "backslashreplace").decode("utf-8")


class HistoryRecorder:
    """Samples the training loop into the console files.

    Owned by the loop's main thread (``record``, ``drift``); dead letters come from the batching
    thread and are handed over through a bounded queue (``dead_letter``).
    """

    def __init__(self, state_dir: Path, show_texts: bool, clock: Callable[[], float] = time.time) -> None:
        self.directory = state_dir / CONSOLE_DIR
        self.show_texts = show_texts
        self.clock = clock
        self._dead_in: queue.Queue[DeadLetter] = queue.Queue(maxsize=4 * LATEST_DEAD)
        self._failed = False
        self._file: HistoryFile | None = None
        now = clock()
        self.snapshot = read_snapshot(self.directory / SNAPSHOT_FILE) or Snapshot(t=now)
        if not self.show_texts:  # texts an earlier run kept while it was allowed to
            self.snapshot.dead_letters = [d.model_copy(update={"text": None}) for d in self.snapshot.dead_letters]
        self._last = (time.monotonic(), 0.0, 0.0)  # (when, records in, events trained) at the last point
        # The rejection counter restarts at 0 with the process; the console's counts go on.
        self._earlier_dead = Counter(self.snapshot.dead_letter_counts)
        self._dead_told = Counter(self._earlier_dead)  # what take_new_dead has reported

    def dead_letter(self, rejection: Rejection, record: Record) -> None:
        """Batching thread: note a rejected record (dropped when the main thread is behind)."""
        with contextlib.suppress(queue.Full):
            self._dead_in.put_nowait(dead_letter_of(rejection, record, self.show_texts, self.clock()))

    def take_new_dead(self) -> Counter[str]:
        """Dead letters per reason since the last call (as of the last ``record``): for the log."""
        counts = Counter(self.snapshot.dead_letter_counts)
        new, self._dead_told = counts - self._dead_told, counts
        return new

    def drift(self, detection: Detection) -> None:
        mark = DriftMark(t=self.clock(), detector=detection.detector, stream=detection.stream, index=detection.index)
        self.snapshot.drift = [*self.snapshot.drift, mark][-MAX_DRIFT:]

    def record(self, loop: TrainingLoop) -> None:
        """Append a point and replace the snapshot; a disk that refuses is logged once, not raised."""
        stats = task_stats(loop)  # serving.json read once per task here, the point's included
        point = self._point(loop, stats[0].serving)
        self._update_snapshot(loop, point.t, stats)
        try:
            if self._file is None:
                self._file = HistoryFile(self.directory / HISTORY_FILE)
            self._file.append(point)
            write_atomic(self.directory / SNAPSHOT_FILE, self.snapshot.model_dump_json().encode())
        except OSError as exc:
            if not self._failed:
                log.warning("the console history cannot be written (%s); training goes on", exc)
            self._failed = True
            return
        self._failed = False

    def _point(self, loop: TrainingLoop, serving: int | None) -> Point:
        events = _samples(loop.metrics_registry, "dynft_events_total")
        taken = sum(v for _, v in events)
        trained = sum(v for labels, v in events if labels.get("outcome") == "trained")
        now = time.monotonic()
        at, taken_before, trained_before = self._last
        self._last = (now, taken, trained)
        elapsed = max(now - at, 1e-6)
        buffer, b = loop.buffer, loop.settings.buffer
        return Point(
            t=self.clock(),
            events=loop.prequential.seen,
            steps=loop.trainer.steps,
            rate_in=(taken - taken_before) / elapsed,
            rate_trained=(trained - trained_before) / elapsed,
            accuracy=loop.prequential.accuracy,
            majority=loop.prequential.majority_rate,
            buffer_fill=min(1.0, max(len(buffer) / b.max_events, buffer.nbytes / b.max_bytes)),
            serving=serving,
            latest=loop.publisher.latest_version,
            drift=loop.drift.detections,
        )

    def _update_snapshot(self, loop: TrainingLoop, now: float, stats: list[TaskStat]) -> None:
        snap = self.snapshot
        snap.t, snap.window = now, loop.settings.evaluation.window
        snap.task_stats = stats
        snap.tasks = [stat.task for stat in snap.task_stats]
        snap.labels = self._labels(loop)
        snap.task_labels = self._task_labels(loop)
        counts = _samples(loop.metrics_registry, "dynft_events_rejected_total")
        dead = self._earlier_dead + Counter({labels["reason"]: int(v) for labels, v in counts})
        snap.dead_letter_counts = dict(sorted(dead.items()))
        fresh = []
        while not self._dead_in.empty():
            fresh.append(self._dead_in.get_nowait())
        snap.dead_letters = ([*reversed(fresh), *snap.dead_letters])[:LATEST_DEAD]
        lag = _samples(loop.metrics_registry, "dynft_kafka_lag")
        snap.kafka_lag = [PartitionLag(topic=k["topic"], partition=int(k["partition"]), lag=int(v)) for k, v in lag]

    def _labels(self, loop: TrainingLoop) -> list[LabelStat]:
        """The default task's labels."""
        snap, now = self.snapshot, loop.prequential.seen
        if snap.started_events is None:
            snap.started_events = now
        window = loop.settings.evaluation.window
        names = list(loop.trainer.label_map.labels)
        return label_stats(loop.prequential, loop.buffer, names, window, snap.first_seen, snap.started_events)

    def _task_labels(self, loop: TrainingLoop) -> dict[str, list[LabelStat]]:
        """Each named task's labels, measured in its own prequential events."""
        snap, window = self.snapshot, loop.settings.evaluation.window
        out = {}
        for name, task in sorted(loop.tasks.items()):
            started = snap.task_started.setdefault(name, task.prequential.seen)
            first_seen = snap.task_first_seen.setdefault(name, {})
            names = list(task.trainer.label_map.labels)
            out[name] = label_stats(task.prequential, task.buffer, names, window, first_seen, started)
        return out


def label_stats(
    prequential: Prequential,
    buffer: ReplayBuffer,
    labels: list[str],
    window: int,
    first_seen: dict[str, int],
    started: int,
) -> list[LabelStat]:
    """Per-label counts and accuracy over one task's prequential window; "new" is measured in its
    events too: first seen within the last ``window`` events, and not in the first window after
    ``started``. Notes each label's first sighting in ``first_seen``."""
    seen: Counter[str] = Counter()
    right: Counter[str] = Counter()
    for truth, prediction, _ in prequential.snapshot()["recent"]:
        seen[truth] += 1
        right[truth] += prediction == truth
    buffered = buffer.label_counts()
    now = prequential.seen
    for label in labels:
        first_seen.setdefault(label, now)
    return [
        LabelStat(
            label=label,
            count=seen[label],
            accuracy=right[label] / seen[label] if seen[label] else None,
            buffered=buffered[label],
            new=first_seen[label] >= started + window and now - first_seen[label] < window,
        )
        for label in labels
    ]


def task_stats(loop: TrainingLoop) -> list[TaskStat]:
    """The default task's figures, then every other task's, by name."""
    parts = [(DEFAULT_TASK, loop.prequential, loop.publisher, loop.drift)]
    parts += [(name, t.prequential, t.publisher, t.drift) for name, t in sorted(loop.tasks.items())]
    return [
        TaskStat(
            task=name,
            events=pq.seen,
            accuracy=pq.accuracy,
            serving=publisher.serving_now(),
            latest=publisher.latest_version,
            drift=drift.detections,
        )
        for name, pq, publisher, drift in parts
    ]
