"""The event ledger: what became of every event id (trained, held out, dead-lettered, skipped).

Outcomes are recorded as the training loop finishes with each event and made durable just
before each checkpoint is written (``commit``). After a crash the ledger therefore knows at
least what the restored checkpoint covers; what it knows beyond that, the source delivers again
and ``seen`` (deliveries) counts the duplicate, so at-least-once is visible. An event the
checkpoint holds is never missing from the ledger (until retention prunes it). Stored in SQLite
(WAL mode), readable by ``dynft ledger`` while the trainer writes.

Growth is bounded by ``LedgerPruner``: a background thread with its own connection deletes the
ids not seen for ``retention_days`` and, beyond ``max_rows``, the least recently seen ones.

>>> import tempfile
>>> ledger = Ledger(Path(tempfile.mkdtemp()) / "ledger.db")
>>> ledger.record([("a", "trained"), ("b", "dead_lettered"), ("a", "trained")])
>>> ledger.commit()
>>> ledger.lookup(["a", "b", "c"])
{'a': ('trained', 2), 'b': ('dead_lettered', 1), 'c': ('unseen', 0)}

SQLite stores UTF-8 only, so an id with a lone surrogate (from a file name that is not UTF-8,
say) is stored with it written as a ``\\udXXX`` escape; ``lookup`` applies the same escape.

>>> ledger.record([("file:\\udcff:3", "dead_lettered")])
>>> ledger.commit()
>>> ledger.lookup(["file:\\udcff:3"])
{'file:\\udcff:3': ('dead_lettered', 1)}
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path

from dynft.errors import DynftError, StateCorruptError

log = logging.getLogger(__name__)

STATUSES = ("trained", "held_out", "dead_lettered", "skipped", "buffered")  # buffered: replay only

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    seen INTEGER NOT NULL,
    first_at REAL NOT NULL,
    last_at REAL NOT NULL
)
"""
_COLUMNS_ORDER = ("id", "status", "seen", "first_at", "last_at")
_COLUMNS = frozenset(_COLUMNS_ORDER)
_INDEX = "CREATE INDEX IF NOT EXISTS events_last_at ON events (last_at)"  # what pruning deletes by
_UPSERT = """
INSERT INTO events (id, status, seen, first_at, last_at) VALUES (?, ?, 1, ?, ?)
ON CONFLICT(id) DO UPDATE SET status = excluded.status, seen = seen + 1, last_at = excluded.last_at
"""


class Ledger:
    """The trainer's ledger (``create``: the schema is written when missing), or, for a reader
    such as ``dynft ledger``, an existing one that is checked and never written to."""

    def __init__(self, path: Path, create: bool = True) -> None:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = _connect(path, create)
        try:
            _prepare(self._db, path, create)
        except sqlite3.OperationalError:  # a full, locked or read-only disk: not the file's fault
            self._db.close()
            raise
        except sqlite3.DatabaseError as exc:  # "file is not a database", "disk image is malformed"
            self._db.close()
            raise _damaged(path, exc) from exc
        except StateCorruptError:
            self._db.close()
            raise
        self._pending: list[tuple[str, str, float, float]] = []
        self._lock = threading.Lock()

    def record(self, outcomes: Iterable[tuple[str, str]]) -> None:
        """Note outcomes ``(event_id, status)``; durable after the next ``commit``."""
        now = time.time()
        with self._lock:
            self._pending.extend((_key(event_id), status, now, now) for event_id, status in outcomes)

    def commit(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            self._db.execute("BEGIN")
            self._db.executemany(_UPSERT, pending)
            self._db.execute("COMMIT")
        except BaseException:
            # A full or read-only disk, or anything else: keep the outcomes for the next commit,
            # and leave no transaction open (the next BEGIN would fail on it forever).
            with self._lock:
                self._pending[:0] = pending
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    @property
    def pending(self) -> int:
        """Outcomes recorded but not yet committed (held in memory)."""
        return len(self._pending)

    def discard(self) -> None:
        """Forget outcomes not yet committed (the state they describe was not checkpointed)."""
        with self._lock:
            self._pending = []

    def lookup(self, ids: Iterable[str]) -> dict[str, tuple[str, int]]:
        """``(status, times seen)`` for each id; ``("unseen", 0)`` for ids never recorded."""
        with self._reading():
            return self._lookup(list(ids))

    def _lookup(self, wanted: list[str]) -> dict[str, tuple[str, int]]:
        found: dict[str, tuple[str, int]] = {}
        for start in range(0, len(wanted), 500):
            chunk = [_key(i) for i in wanted[start : start + 500]]
            marks = ",".join("?" * len(chunk))
            for event_id, status, seen in self._db.execute(
                f"SELECT id, status, seen FROM events WHERE id IN ({marks})", chunk
            ):
                found[event_id] = (status, seen)
        return {i: found.get(_key(i), ("unseen", 0)) for i in wanted}

    def counts(self) -> dict[str, int]:
        """Events per status, and ``duplicates``: deliveries beyond the first."""
        out = {status: 0 for status in STATUSES}
        with self._reading():
            for status, n in self._db.execute("SELECT status, COUNT(*) FROM events GROUP BY status"):
                out[status] = n
            out["duplicates"] = int(self._db.execute("SELECT COALESCE(SUM(seen - 1), 0) FROM events").fetchone()[0])
        return out

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """A query's failure, naming the ledger: a reader does not check every page at open (a
        damaged one fails here), and one reading a live ledger on a read-only mount may meet a
        page torn by a write, which a retry reads whole (so exit 1, not 2)."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            raise DynftError(f"ledger {self.path}: cannot read it ({exc})") from exc

    def close(self) -> None:
        self._db.close()


def _connect(path: Path, create: bool) -> sqlite3.Connection:
    """The trainer's connection, or a reader's (never written through)."""
    if path.exists() and not path.is_file():
        raise StateCorruptError(f"ledger {path}: not a file; move it aside to start a new ledger")
    if create:
        return sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    uri = f"file://{urllib.parse.quote(os.path.abspath(path))}?mode=ro"  # "file://" + "//x" would be a host
    db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA schema_version")  # opening is lazy: this is where it fails
        return db
    except sqlite3.OperationalError as exc:
        db.close()
        if os.access(path.parent, os.W_OK):
            raise DynftError(f"ledger {path}: cannot open it ({exc})") from exc
    except sqlite3.DatabaseError as exc:
        db.close()
        raise _damaged(path, exc) from exc
    # A read-only directory (a mounted copy, a backup): SQLite cannot make the shared-memory
    # file a WAL database is read through. Read as it is: a WAL left by a trainer that was
    # killed is not seen (its last outcomes are missing), which a trainer's next start repairs.
    wal = path.with_name(path.name + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        log.warning("ledger %s: its directory is read-only; reading it without its write-ahead log", path)
    return sqlite3.connect(uri + "&immutable=1", uri=True, check_same_thread=False, isolation_level=None)


def _prepare(db: sqlite3.Connection, path: Path, create: bool) -> None:
    """The trainer's schema and durability settings, or a reader's check of them; then the pages."""
    if create:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(_SCHEMA)
        db.execute(_INDEX)
    else:
        _check_schema(db, path)
        return  # a reader: a lookup is not worth reading the whole file (and it may be live)
    # Damaged pages past the header open without an error and fail every later commit, so every
    # checkpoint, while the trainer goes on; checked once here (it reads the file: about a second
    # per 100 MB).
    problem = db.execute("PRAGMA quick_check(1)").fetchone()[0]
    if problem != "ok":
        raise sqlite3.DatabaseError(f"database disk image is malformed: {problem}")


def _damaged(path: Path, exc: sqlite3.DatabaseError) -> StateCorruptError:
    return StateCorruptError(
        f"ledger {path}: not a readable SQLite database ({exc}); move it (and any -wal and -shm "
        "files beside it) aside to start a new ledger: only the record of past outcomes is lost"
    )


def _check_schema(db: sqlite3.Connection, path: Path) -> None:
    """An existing ledger has the events table the trainer writes; anything else is named, not
    queried into a "no such column" error (and not given a schema by a reader)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(events)")}
    if not columns >= _COLUMNS:
        found = "no events table" if not columns else f"an events table with columns {', '.join(sorted(columns))}"
        raise StateCorruptError(
            f"ledger {path}: not a dynft ledger ({found}; expected columns {', '.join(_COLUMNS_ORDER)})"
        )


def prune(db: sqlite3.Connection, before: float | None, max_rows: int | None, chunk: int = 5000) -> int:
    """Delete ids last seen before ``before`` and, beyond ``max_rows``, the least recently seen.

    Deletes in transactions of ``chunk`` rows, so the trainer's commit never waits long for the
    write lock. Returns how many rows were deleted.
    """
    deleted = 0
    if before is not None:
        while True:
            n = db.execute(
                "DELETE FROM events WHERE rowid IN (SELECT rowid FROM events WHERE last_at < ? LIMIT ?)",
                (before, chunk),
            ).rowcount
            deleted += n
            if n < chunk:
                break
    if max_rows is not None:
        excess = int(db.execute("SELECT COUNT(*) FROM events").fetchone()[0]) - max_rows
        while excess > 0:
            n = db.execute(
                "DELETE FROM events WHERE rowid IN (SELECT rowid FROM events ORDER BY last_at LIMIT ?)",
                (min(chunk, excess),),
            ).rowcount
            deleted, excess = deleted + n, excess - n
            if n == 0:
                break
    return deleted


class LedgerPruner:
    """Prunes the ledger every ``interval_s`` on its own thread, which owns its own connection.

    SQLite connections belong to one thread, so the pruner never touches the trainer's. WAL mode
    lets both write in turn: the pruner's short transactions and the trainer's commit wait for
    each other through the busy timeout, never fail on each other. A prune that fails (a full
    disk: a DELETE needs room in the WAL) is logged and tried again at the next interval.
    ``retention_days`` 0 and ``max_rows`` 0 switch their rule off.
    """

    def __init__(self, path: Path, retention_days: float, max_rows: int, interval_s: float) -> None:
        self.path = path
        self.retention_s = retention_days * 86400.0 if retention_days > 0 else None
        self.max_rows = max_rows or None
        self.interval_s = interval_s
        self.pruned = 0  # rows deleted so far (read by tests and the log)
        self.runs = 0  # completed prunes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dynft-ledger-pruner", daemon=True)

    def start(self) -> None:
        if self.retention_s is not None or self.max_rows is not None:
            self._thread.start()

    def _run(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        try:
            while not self._stop.is_set():
                before = time.time() - self.retention_s if self.retention_s is not None else None
                try:
                    n = prune(db, before, self.max_rows)
                except Exception as exc:  # sqlite3.Error, or anything else: the pruner must outlive it
                    log.warning("ledger %s: pruning failed (%s); next try in %.0f s", self.path, exc, self.interval_s)
                else:
                    self.pruned += n
                    self.runs += 1
                    if n:
                        log.info("ledger %s: pruned %d event id(s)", self.path, n)
                self._stop.wait(self.interval_s)
        finally:
            db.close()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)


def _key(event_id: str) -> str:
    """The stored form of an id: lone surrogates (not encodable as UTF-8) written as escapes."""
    return event_id if event_id.isascii() else event_id.encode("utf-8", "backslashreplace").decode("utf-8")
