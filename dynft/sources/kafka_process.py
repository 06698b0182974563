"""The Kafka source in a child process: the client's work runs on another core.

kafka-python parses every fetched record in Python, which is most of ingest's CPU; in the
trainer's process it shares the GIL with decoding, buffering and the training step. Here a child
process (``python -m dynft.sources.kafka_process``) runs the whole ``KafkaSource`` (group
membership, rebalances, commits, lag) and hands raw records to the parent over a socket pair.

- One request is always in flight: the parent asks for the next batch as soon as it has the
  previous one, so the child polls while the parent decodes. Memory stays bounded by one batch.
- What the parent decides travels with each request, in order: offsets to commit (``commit``),
  whether commits are allowed (``may_commit``, asked when the request is sent), pause/resume.
  What the child learns comes back with each batch: partitions revoked, whether it is at the
  end, its log records (re-emitted in the parent under their own logger names) and, every
  ``METRICS_EVERY_S``, its metrics (served by the parent's registry as they are).
- The child ignores SIGINT and SIGTERM (the parent stops it through ``close``, with the final
  commit) and exits when the parent's end of the socket closes (a parent killed commits nothing
  more, as a killed single process would not). An exception in the child is raised by the
  parent's next ``poll``; the child process dying is a ``SourceError``.

Threads: the intake thread owns the socket (``poll``, then ``close`` after it stopped); ``commit``
may be called from any thread and only appends under a lock.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from dynft.errors import SourceError
from dynft.settings import KafkaSettings
from dynft.sources.base import Positions, Record, Source
from dynft.sources.kafka_connect import parse_kafka_uri, quiet_kafka_logs

log = logging.getLogger(__name__)
CLOSE_TIMEOUT_S = 60.0  # the final commit and leaving the group; the child is killed after it
METRICS_EVERY_S = 0.1  # how often the child sends its metrics with a batch (a scrape sees them this late)


class KafkaProcessSource(Source):
    """``KafkaSource``'s interface, its work done in a child process (see the module docstring)."""

    def __init__(self, uri: str, settings: KafkaSettings, registry: CollectorRegistry) -> None:
        self.uri = uri
        self.servers, self.topics, self.group = parse_kafka_uri(uri, settings.group)  # a bad URI fails here
        self.settings = settings
        self.may_commit: Callable[[], bool] = lambda: True  # as KafkaSource's (dynft.term.fence_commits)
        self.partitions: frozenset[int] | None = None  # as KafkaSource's: set before ``open``
        self._resume: Positions = {}
        self._mirror = _Mirror()
        registry.register(self._mirror)
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._asked = False  # a request is in flight
        self._paused = False
        self._at_end = False
        self._revoked: set[str] = set()
        self._commits: list[Positions] = []  # offered by any thread, sent with the next request
        self._commits_lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs (the ingest benchmark counts its CPU)."""
        return self._proc.pid if self._proc is not None else None

    def resume_from(self, positions: Positions) -> None:
        self._resume = dict(positions)

    def open(self) -> None:
        """Start the child and open the source there; its ``KafkaRefusedError`` is raised here."""
        ours, theirs = socket.socketpair()
        try:
            fd = theirs.fileno()
            argv = [sys.executable, "-m", __name__, str(fd)]
            self._proc = subprocess.Popen(argv, pass_fds=[fd], stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        level = logging.getLogger().getEffectiveLevel()
        try:
            self._send(("open", self.uri, self.settings, self._resume, self.partitions, level))
            self._handle(self._next())  # "opened", or the error raised
        except BaseException:
            self._end_child()
            raise

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        conn = self._require()
        if not self._asked:
            self._ask(max_records, timeout_s)
        if not conn.poll(timeout_s):
            return []
        rows, revoked, at_end = self._receive()
        self._ask(max_records, timeout_s)  # the child polls the next batch while this one is processed
        self._revoked |= revoked
        self._at_end = at_end
        return [Record(raw, stream, next_, key, headers=headers) for raw, stream, next_, key, headers in rows]

    def _ask(self, max_records: int, timeout_s: float) -> None:
        with self._commits_lock:
            commits, self._commits = self._commits, []
        self._send(("poll", max_records, timeout_s, commits, self.may_commit(), self._paused))
        self._asked = True

    def _receive(self) -> Any:
        """The child's next answer's payload (see ``_handle``)."""
        return self._handle(self._next())

    def _next(self) -> tuple[Any, ...]:
        try:
            message: tuple[Any, ...] = self._require().recv()
        except (EOFError, OSError) as exc:
            code = self._proc.poll() if self._proc is not None else None
            raise SourceError(f"{self.uri}: the Kafka consumer process ended (exit code {code})") from exc
        self._asked = False
        return message

    def _handle(self, message: tuple[Any, ...]) -> Any:
        """An answer's payload, after re-emitting its logs and keeping its metrics; its error raised."""
        kind, payload, logs, families = message
        for fields in logs:
            record = logging.makeLogRecord(fields)
            logging.getLogger(record.name).handle(record)
        if families is not None:
            self._mirror.families = families
        if kind == "error":
            raise _unpickled(payload)
        return payload

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            self._require().send(message)
        except OSError as exc:
            code = self._proc.poll() if self._proc is not None else None
            raise SourceError(f"{self.uri}: the Kafka consumer process ended (exit code {code})") from exc

    def _require(self) -> Connection:
        if self._conn is None:
            raise SourceError(f"{self.uri}: used before open")
        return self._conn

    def at_end(self) -> bool:
        return self._at_end

    def take_revoked(self) -> set[str]:
        revoked, self._revoked = self._revoked, set()
        return revoked

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def commit(self, positions: Positions) -> None:
        """Queue a commit; the child runs it at its next poll, as ``KafkaSource.commit`` does."""
        with self._commits_lock:
            self._commits.append(dict(positions))

    def close(self) -> None:
        """The final commit and leaving the group, in the child; then the child ends."""
        if self._conn is None:
            return
        try:
            with self._commits_lock:
                commits, self._commits = self._commits, []
            self._send(("close", 0, 0.0, commits, self.may_commit(), self._paused))
            deadline = time.monotonic() + CLOSE_TIMEOUT_S
            while self._conn.poll(max(0.0, deadline - time.monotonic())):
                message = self._next()  # the batch still in flight, then "closed"
                try:
                    if self._handle(message) == "closed":
                        break
                except Exception as exc:  # the child's own error (its final commit, say), raised again by _handle
                    log.warning("%s: closing the consumer: %s: %s", self.uri, type(exc).__name__, exc)
        except SourceError as exc:  # the child had ended already
            log.warning("%s", exc)
        finally:
            self._end_child()

    def _end_child(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is None:
            return
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            log.warning("%s: the Kafka consumer process did not end; killing it", self.uri)
            self._proc.kill()
            self._proc.wait()
        self._proc = None


class _Mirror:
    """A collector that serves the child's metric families as last received."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterable[Metric]:
        return list(self.families)


def _unpickled(payload: bytes) -> BaseException:
    try:
        error = pickle.loads(payload)  # from our own child: trusted
    except Exception as exc:  # an exception type that does not unpickle (its own __init__ arguments)
        return SourceError(f"the Kafka consumer process failed ({type(exc).__name__} unpickling its error)")
    return error if isinstance(error, BaseException) else SourceError(repr(error))


def _pickled(exc: BaseException) -> bytes:
    try:
        return pickle.dumps(exc)
    except Exception:
        return pickle.dumps(SourceError(f"{type(exc).__name__}: {exc}"))


# -- the child ---------------------------------------------------------------------------------


class _Logs(logging.Handler):
    """Keeps the child's log records, as plain fields, until the next answer carries them."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        # Plain values only (an ``extra`` may not pickle); the message formatted here, with its traceback.
        fields = {k: v for k, v in record.__dict__.items() if isinstance(v, str | int | float) and k != "args"}
        fields["msg"] = record.getMessage()
        if record.exc_info:
            fields["exc_text"] = logging.Formatter().formatException(record.exc_info)
        self.records.append(fields)

    def take(self) -> list[dict[str, Any]]:
        out, self.records = self.records, []
        return out


def _serve(conn: Connection) -> None:
    """The child's loop: open the source, then answer each request with a batch."""
    from dynft.metrics import KafkaMetrics
    from dynft.sources.kafka import KafkaSource

    logs, registry = _Logs(), CollectorRegistry()

    def answer(kind: str, payload: Any, metrics: bool = True) -> None:
        conn.send((kind, payload, logs.take(), list(registry.collect()) if metrics else None))

    _, uri, settings, resume, partitions, level = conn.recv()
    logging.getLogger().addHandler(logs)
    logging.getLogger().setLevel(level)
    quiet_kafka_logs(level)  # re-emitted by the parent whatever its loggers' levels: filtered here
    allowed = [True]  # the parent's may_commit, as of its last request
    try:
        source = KafkaSource(uri, settings, KafkaMetrics(registry))
        source.may_commit = lambda: allowed[0]
        source.partitions = partitions
        source.resume_from(resume)
        source.open()
    except Exception as exc:
        answer("error", _pickled(exc))
        return
    answer("opened", None)
    try:
        _answer_polls(conn, source, allowed, answer)
    except (EOFError, OSError):  # the parent is gone: nothing more is committed, and no one hears of errors
        allowed[0] = False
        with contextlib.suppress(Exception):
            source.close()  # leaves the group at once rather than after the session timeout
        return
    try:
        source.close()  # the final commit
    except Exception as exc:
        answer("error", _pickled(exc))
        return
    answer("closed", "closed")


def _answer_polls(
    conn: Connection, source: Source, allowed: list[bool], answer: Callable[[str, Any, bool], None]
) -> None:
    """Answer each poll request until the parent asks to close (its commits made first)."""
    failed, was_paused, metrics_at = False, False, time.monotonic()
    while True:
        kind, max_records, timeout_s, commits, allowed[0], paused = conn.recv()
        for positions in commits:
            source.commit(positions)
        if kind == "close":
            return
        if failed:
            continue  # the parent was told; it closes
        try:
            if paused != was_paused:
                source.pause() if paused else source.resume()
                was_paused = paused
            batch = _poll(source, max_records, timeout_s)
        except Exception as exc:
            failed = True
            answer("error", _pickled(exc), True)
            continue
        due = time.monotonic() - metrics_at >= METRICS_EVERY_S
        metrics_at = time.monotonic() if due else metrics_at
        answer("batch", batch, due)


def _poll(source: Source, max_records: int, timeout_s: float) -> tuple[list[Any], set[str], bool]:
    """One poll in the child: the records as rows, the streams revoked, whether at the end."""
    records = source.poll(max_records, timeout_s)
    rows = [(r.raw, r.stream, r.next, r.key, r.headers) for r in records]
    return rows, source.take_revoked(), not records and source.at_end()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops this process, with the final commit
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn = Connection(int(sys.argv[1]))
    try:
        _serve(conn)
    finally:
        conn.close()


if __name__ == "__main__":
    main()
