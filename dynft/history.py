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
trainer its progress. What goes into them is taken from the loop by ``dynft.recorder``.

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
import logging
import os
import threading
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from dynft.durable import write_atomic

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
