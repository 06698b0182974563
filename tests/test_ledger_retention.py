"""Ledger retention: ids not seen for ``retention_days`` are pruned, and the row cap holds, on a
background thread with its own SQLite connection while the trainer's connection keeps committing.

Age is produced by writing ``last_at`` in the past straight into the database (what the ledger
would hold after the days had really passed); nothing in the code under test is replaced.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from dynft.ledger import Ledger, LedgerPruner, prune
from dynft.loop import TrainingLoop
from dynft.settings import Settings

from helpers import keyword_events, write_jsonl

DAY = 86400.0


def age(path: Path, ages_s: dict[str, float]) -> None:
    """Set each id's ``last_at`` to ``ages_s[id]`` seconds ago."""
    now = time.time()
    with sqlite3.connect(path) as db:
        db.executemany("UPDATE events SET last_at = ? WHERE id = ?", [(now - a, i) for i, a in ages_s.items()])


def wait_for(condition: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def test_the_background_pruner_deletes_ids_older_than_the_retention(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.record([(f"e{i}", "trained") for i in range(10)])
    ledger.commit()
    age(ledger.path, {"e0": 31 * DAY, "e1": 45 * DAY, "e2": 29 * DAY})
    pruner = LedgerPruner(ledger.path, retention_days=30, max_rows=0, interval_s=0.05)
    pruner.start()
    try:
        wait_for(lambda: pruner.runs >= 1, "the pruner has run")
        # Seen again after the prune: the id comes back as a new row, as the ledger's answer should.
        ledger.record([("e1", "held_out")])
        ledger.commit()
    finally:
        pruner.stop()
    assert pruner.pruned == 2
    found = ledger.lookup(["e0", "e1", "e2", "e3"])
    assert found == {"e0": ("unseen", 0), "e1": ("held_out", 1), "e2": ("trained", 1), "e3": ("trained", 1)}
    assert ledger.counts()["trained"] == 8  # e2..e9
    ledger.close()


def test_the_row_cap_keeps_the_most_recently_seen_ids(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.record([(f"e{i}", "trained") for i in range(1200)])
    ledger.commit()
    age(ledger.path, {f"e{i}": 1200.0 - i for i in range(1200)})  # e0 is the oldest
    assert prune(ledger._db, before=None, max_rows=1000, chunk=64) == 200
    assert ledger.counts()["trained"] == 1000
    lookup = ledger.lookup([f"e{i}" for i in range(1200)])
    assert [i for i in range(1200) if lookup[f"e{i}"][0] == "unseen"] == list(range(200))
    assert prune(ledger._db, before=None, max_rows=1000) == 0  # at the cap: nothing more goes
    ledger.close()


def test_pruning_runs_beside_the_trainers_commits_without_failing_them(tmp_path: Path) -> None:
    """The trainer's thread commits batches while the pruner's thread deletes: every commit goes
    through (each connection waits for the other's short transaction), and the cap holds."""
    ledger = Ledger(tmp_path / "ledger.db")
    pruner = LedgerPruner(ledger.path, retention_days=0, max_rows=300, interval_s=0.001)
    pruner.start()
    failures: list[BaseException] = []

    def trainer() -> None:  # the ledger's own connection is used by this thread only
        try:
            for batch in range(40):
                ledger.record([(f"b{batch}-{i}", "trained") for i in range(50)])
                ledger.commit()
        except BaseException as exc:  # reported below
            failures.append(exc)

    thread = threading.Thread(target=trainer)
    thread.start()
    thread.join(60)
    runs = pruner.runs  # a run under way now may have read the rows before the last commit:
    wait_for(lambda: pruner.runs > runs + 1, "a prune begun after the last commit")  # the next one has not
    pruner.stop()
    assert not failures and ledger.pending == 0
    assert ledger.counts()["trained"] == 300
    newest = ledger.lookup(f"b39-{i}" for i in range(50))
    assert all(status == "trained" for status, _ in newest.values()), "the newest outcomes are kept"
    assert pruner.pruned == 40 * 50 - 300
    ledger.close()


def test_no_rule_no_thread(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    pruner = LedgerPruner(ledger.path, retention_days=0, max_rows=0, interval_s=0.01)
    pruner.start()
    assert not pruner._thread.is_alive()
    pruner.stop()
    ledger.close()


def test_the_training_loop_prunes_its_ledger_to_the_row_cap(tiny_settings: Settings, tmp_path: Path) -> None:
    """``ledger.max_rows`` reaches the daemon: its pruner thread deletes the least recently seen ids."""
    s = tiny_settings
    rows = keyword_events(600, ["alpha", "beta"], seed=4)
    s.source.uri, s.source.exit_at_end = f"file:{write_jsonl(tmp_path / 'in.jsonl', rows)}", True
    s.checkpoint.every_steps = 5
    s.ledger.max_rows, s.ledger.prune_interval_s = 100, 0.05
    loop = TrainingLoop(s, CollectorRegistry())
    thread = threading.Thread(target=loop.run)
    thread.start()
    thread.join(180)
    assert not thread.is_alive()
    assert loop.pruner.pruned > 0 and not loop.pruner._thread.is_alive()
    ledger = Ledger(s.state_dir / "ledger.db")
    try:
        found = ledger.lookup(r["id"] for r in rows)
        kept = sum(ledger.counts()[status] for status in ("trained", "held_out", "skipped", "dead_lettered"))
    finally:
        ledger.close()
    assert found[rows[0]["id"]] == ("unseen", 0), "the first ids were pruned"
    assert kept < 600 and kept == sum(1 for status, _ in found.values() if status != "unseen")


def test_outcomes_waiting_for_a_commit_are_bounded(tiny_settings: Settings, tmp_path: Path) -> None:
    """With checkpoints otherwise far apart, ``ledger.max_pending_rows`` bounds the outcomes held
    in memory: at the bound the intake is held and a checkpoint commits them; nothing is lost."""
    s = tiny_settings
    rows = keyword_events(300, ["alpha", "beta"], seed=6)
    s.source.uri, s.source.exit_at_end = f"file:{write_jsonl(tmp_path / 'in.jsonl', rows)}", True
    s.checkpoint.every_steps, s.checkpoint.interval_s = 10_000, 600
    s.ledger.max_pending_rows = 40
    metrics = CollectorRegistry()
    loop = TrainingLoop(s, metrics)
    peak = 0
    thread = threading.Thread(target=loop.run)
    thread.start()
    while thread.is_alive():
        peak = max(peak, loop.ledger.pending)
        time.sleep(0.001)
    thread.join()
    # At the bound the batching thread takes nothing; what was already under way (two queued
    # batches and the one being completed) may still land: at most 3 batches over.
    assert peak < 40 + 3 * s.trainer.batch_size
    assert (metrics.get_sample_value("dynft_checkpoints_total") or 0) >= 300 // (40 + 3 * s.trainer.batch_size)
    ledger = Ledger(s.state_dir / "ledger.db")
    try:
        found = ledger.lookup(r["id"] for r in rows)
    finally:
        ledger.close()
    assert not [i for i, (status, _) in found.items() if status == "unseen"]
