"""The console's record of a training run: a bounded time series and a snapshot, in the state directory.

The trainer writes two files under ``<state_dir>/run/console/``; the server reads them for the
page at ``/`` (``dynft.serving.console``):

* ``history.jsonl``: one ``Point`` per status interval, appended. It keeps the last 24 hours
  (at most ``MAX_POINTS`` points) and survives restarts, so the curves show where a run came
  from. A crash can leave a half-written last line: readers skip it and the next writer cuts
  it off before appending.
* ``snapshot.json``: what is not a time series (labels, dead letters, drift detections, Kafka
  lag), replaced atomically at each status interval.

Writing is best-effort: a full or read-only disk costs the console its history, never the
trainer its progress.

>>> import tempfile
>>> directory = Path(tempfile.mkdtemp())
>>> log = HistoryFile(directory / HISTORY_FILE)
>>> for t in (1.0, 2.0, 3.0):
...     log.append(Point(t=t, events=int(t) * 10))
>>> [p.events for p in read_points(directory / HISTORY_FILE, since=1.0)]
[20, 30]
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from pydantic import BaseModel, Field, ValidationError

from dynft.durable import write_atomic
from dynft.events import DEFAULT_TASK, Rejection
from dynft.sources import Record

if TYPE_CHECKING:  # drift imports river and scikit-learn: seconds a serve-only process does not need
    from dynft.buffer import ReplayBuffer
    from dynft.drift import Detection
    from dynft.evaluation import Prequential
    from dynft.loop import TrainingLoop

log = logging.getLogger(__name__)

CONSOLE_DIR = Path("run") / "console"  # under the state directory
HISTORY_FILE, SNAPSHOT_FILE = "history.jsonl", "snapshot.json"
SPAN_S = 24 * 3600.0  # history kept
MAX_POINTS = 20_000  # 24 h at the default 5 s interval is 17,280
MAX_SENT = 2_000  # points one /v1/status answer holds at most (evenly spaced, the newest last)
LATEST_DEAD = 5  # dead letters shown
MAX_DRIFT = 100  # drift markers kept
TEXT_CHARS = 120  # dead letters' texts are cut to this


class Point(BaseModel):
    """One sample of the training run, taken at each status interval."""

    t: float = Field(description="Unix time, seconds")
    events: int = Field(0, description="events the trainer has tested and trained on (prequential count)")
    steps: int = Field(0, description="training steps")
    rate_in: float = Field(0.0, description="records taken from the source per second")
    rate_trained: float = Field(0.0, description="events trained on per second")
    accuracy: float = Field(0.0, description="rolling prequential (test-then-train) accuracy")
    majority: float = Field(0.0, description="share of the most frequent label in the same window")
    buffer_fill: float = Field(0.0, description="replay buffer fill, 0-1 (events or bytes, the fuller)")
    serving: int | None = Field(None, description="serving adapter version")
    latest: int | None = Field(None, description="newest published adapter version")
    drift: int = Field(0, description="drift detections so far")


class LabelStat(BaseModel):
    label: str
    count: int = Field(description="events with this label in the prequential window")
    accuracy: float | None = Field(description="prequential accuracy on them; null when none in the window")
    buffered: int = Field(description="events with this label in the replay buffer")
    new: bool = Field(
        description="first seen within the last `window` events, and not in the history's first window "
        "(those are where the run began)"
    )


class DeadLetter(BaseModel):
    t: float
    id: str = Field(description="the event's id where it could be read, else its position in the stream")
    reason: str
    detail: str = Field(
        "", description=f"why (first {TEXT_CHARS} chars); of an internal error, its type only unless texts are shown"
    )
    text: str | None = Field(None, description=f"first {TEXT_CHARS} chars; only with server.console_show_texts")


class DriftMark(BaseModel):
    t: float
    detector: str
    stream: str = Field(description="error or loss")
    index: int = Field(description="position of the triggering event in the prequential stream")


class PartitionLag(BaseModel):
    topic: str
    partition: int
    lag: int


class TaskStat(BaseModel):
    """One task's line in the console's task table (``dynft.tasks``)."""

    task: str
    events: int = Field(description="events seen by its prequential evaluation")
    accuracy: float = Field(description="prequential accuracy over the window")
    serving: int | None
    latest: int | None
    drift: int = Field(description="drift detections")


class Snapshot(BaseModel):
    """The trainer's current state that is not a time series."""

    t: float
    tasks: list[str] = Field(default_factory=lambda: ["default"])
    task_stats: list[TaskStat] = Field(default_factory=list, description="each task's figures, default first")
    window: int = Field(0, description="events in the prequential window the label counts cover")
    labels: list[LabelStat] = Field(default_factory=list)
    dead_letter_counts: dict[str, int] = Field(
        default_factory=dict, description="since the history began, restarts included (a redelivered record again)"
    )
    dead_letters: list[DeadLetter] = Field(default_factory=list, description="the latest few, newest first")
    drift: list[DriftMark] = Field(default_factory=list, description="recent detections, oldest first")
    kafka_lag: list[PartitionLag] = Field(default_factory=list)
    first_seen: dict[str, int] = Field(
        default_factory=dict, description="the prequential event count when each label was first seen"
    )
    started_events: int | None = Field(None, description="the prequential event count when this history began")
    task_labels: dict[str, list[LabelStat]] = Field(
        default_factory=dict, description="each named task's labels, as `labels` (the default task's)"
    )
    task_first_seen: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="each named task's `first_seen`, in its own prequential count"
    )
    task_started: dict[str, int] = Field(
        default_factory=dict, description="each named task's `started_events`: its count when first recorded"
    )


# -- the time series -----------------------------------------------------------------------


def _parse(lines: list[bytes]) -> list[Point]:
    points = []
    for line in lines:
        try:
            points.append(Point.model_validate_json(line))
        except ValidationError:  # a line torn by a crash: skipped, as the module promises
            continue
    return points


def read_points(path: Path, since: float | None = None) -> list[Point]:
    """The points in ``path`` newer than ``since``; torn or corrupt lines are skipped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    points = _parse(data.split(b"\n")[:-1])  # the part after the last newline is unfinished
    return [p for p in points if since is None or p.t > since]


class HistoryFile:
    """The append side of ``history.jsonl``: repaired on open, compacted when over its bounds."""

    def __init__(self, path: Path, span_s: float = SPAN_S, max_points: int = MAX_POINTS) -> None:
        self.path, self.span_s, self.max_points = path, span_s, max_points
        path.parent.mkdir(parents=True, exist_ok=True)
        points = read_points(path)
        self._count = len(points)
        self._oldest = points[0].t if points else None
        self._repair()

    def _repair(self) -> None:
        """Cut a torn last line off, so the next append starts on a line of its own."""
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb+") as fh:
            data = fh.read()
            if data and not data.endswith(b"\n"):
                fh.truncate(data.rfind(b"\n") + 1)

    def append(self, point: Point) -> None:
        with open(self.path, "ab") as fh:
            fh.write(point.model_dump_json().encode() + b"\n")
        self._count += 1
        self._oldest = point.t if self._oldest is None else self._oldest
        # Compaction rewrites the file: only now and then, when a quarter over a bound.
        too_old = self._oldest < point.t - self.span_s * 1.25
        if too_old or self._count > self.max_points * 1.25:
            self.compact(point.t)

    def compact(self, now: float) -> None:
        """Keep the last ``span_s`` seconds, at most ``max_points``; replaced atomically."""
        kept = [p for p in read_points(self.path) if p.t >= now - self.span_s][-self.max_points :]
        write_atomic(self.path, b"".join(p.model_dump_json().encode() + b"\n" for p in kept))
        self._count, self._oldest = len(kept), kept[0].t if kept else None


class HistoryReader:
    """The read side for the server: parses only what was appended since the last call.

    Called from the server's worker threads, hence the lock. A compaction replaces the file (a
    new inode): then it is read again from the start.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._inode: int | None = None
        self._offset = 0
        self._points: list[Point] = []

    def points(self, since: float | None = None, most: int = MAX_SENT) -> list[Point]:
        """The points newer than ``since``: at most ``most``, every k-th of them and the newest where
        there are more (a first poll of a day's history was 3.4 MB, and ten such polls at once
        slowed every prediction a hundredfold)."""
        with self._lock:
            self._refresh()
            newer = list(self._points) if since is None else [p for p in self._points if p.t > since]
        if len(newer) <= most:
            return newer
        stride = -(-len(newer) // most)
        return newer[(len(newer) - 1) % stride :: stride]  # ends at the newest

    @property
    def exists(self) -> bool:
        return self.path.exists()

    def _refresh(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                stat = os.fstat(fh.fileno())
                if stat.st_ino != self._inode or stat.st_size < self._offset:
                    self._inode, self._offset, self._points = stat.st_ino, 0, []
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            self._inode, self._offset, self._points = None, 0, []
            return
        end = data.rfind(b"\n") + 1  # whole lines only; the rest is read again next time
        self._points += _parse(data[:end].split(b"\n")[:-1])
        self._offset += end
        if len(self._points) > MAX_POINTS * 2:  # a writer that never compacts must not grow this forever
            del self._points[: len(self._points) - MAX_POINTS]


def read_snapshot(path: Path) -> Snapshot | None:
    """The snapshot in ``path``, or None when there is none or it is unreadable."""
    try:
        return Snapshot.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        return None


# -- the recorder in the trainer -----------------------------------------------------------


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
