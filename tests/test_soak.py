"""Soak: 100,000 events through the real trainer without its memory growing.

What this proves: a file source of 100,000 labeled events goes all the way through the real
path (file source -> intake -> decode -> held-out split -> bounded replay buffer -> LoRA
steps on the tiny model -> prequential metrics and drift -> gated publishes -> checkpoints
and ledger commits), every event is accounted for, and the process's resident memory after
warm-up stays within ±15 % of the level it reached at the end of warm-up. Most of that level
is torch and the libraries (about 0.9 GiB), so ±15 % alone would let a slow leak through; the
test also bounds the growth after warm-up to 64 MiB, under 1 KiB per event: an event kept in a
list, a cache growing with the stream or a tensor held per step would exceed it.

Sized for about two minutes on 2 CPU cores: 64-row batches with a quarter replayed keep the
step count near 2,000 while every event still passes through a training step.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from dynft.ledger import Ledger
from dynft.loop import TrainingLoop
from dynft.registry import AdapterRegistry
from dynft.settings import Settings

from helpers import keyword_events

pytestmark = pytest.mark.slow
EVENTS = 100_000
WARM_UP = 0.25  # share of the stream after which memory must have settled
TOLERANCE = 0.15
MAX_GROWTH = 64 * 2**20  # bytes, from the end of warm-up to the end of the stream
LABELS = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]


def rss_bytes() -> int:
    """Resident set size of this process (the loop runs in a thread of it), from the kernel."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def write_stream(path: Path, n: int) -> Path:
    """``n`` events written in chunks, so the test itself never holds the whole stream in memory."""
    with open(path, "w", encoding="utf-8") as fh:
        for start in range(0, n, 10_000):
            rows = keyword_events(min(10_000, n - start), LABELS, seed=start, prefix="soak-", start=start)
            fh.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def counted(metrics: CollectorRegistry, outcome: str) -> int:
    return int(metrics.get_sample_value("dynft_events_total", {"outcome": outcome}) or 0)


def test_100k_events_through_the_real_loop_with_flat_memory(tiny_settings: Settings, tmp_path: Path) -> None:
    s = tiny_settings
    s.source.uri = f"file:{write_stream(tmp_path / 'soak.jsonl', EVENTS)}"
    s.source.exit_at_end = True
    s.source.queue_size = 4096
    s.trainer.batch_size = 64
    s.buffer.replay_ratio = 0.25
    s.buffer.max_events = 2_000  # the bound under test: 50x fewer than the stream
    s.registry.publish_every_steps = 500
    s.registry.publish_interval_s = 600
    s.checkpoint.every_steps = 500
    s.checkpoint.interval_s = 600
    s.run.status_interval_s = 30
    metrics = CollectorRegistry()
    loop = TrainingLoop(s, metrics)
    thread = threading.Thread(target=loop.run, name="soak-loop")
    started = time.monotonic()
    thread.start()

    samples: list[tuple[int, int]] = []  # (events consumed, RSS bytes)
    while thread.is_alive():
        thread.join(0.25)
        seen = counted(metrics, "trained") + counted(metrics, "held_out") + counted(metrics, "skipped")
        samples.append((seen, rss_bytes()))
        assert time.monotonic() - started < 800, f"the soak did not finish in time: {seen} events after 800 s"
    elapsed = time.monotonic() - started

    # Every event really went through: counted by outcome, recorded in the ledger, bounded buffer.
    trained, held_out, skipped = (counted(metrics, o) for o in ("trained", "held_out", "skipped"))
    assert trained + held_out + skipped == EVENTS, f"{trained} trained + {held_out} held out + {skipped} skipped"
    assert counted(metrics, "dead_lettered") == 0
    assert 0.05 * EVENTS < held_out < 0.15 * EVENTS
    assert loop.prequential.seen == trained
    ledger = Ledger(s.state_dir / "ledger.db")
    try:
        book = ledger.counts()
    finally:
        ledger.close()
    assert book["trained"] + book["held_out"] + book["skipped"] == EVENTS and book["duplicates"] == 0, book
    assert len(loop.buffer) <= s.buffer.max_events
    assert loop.trainer.steps >= EVENTS * 0.9 / 48, f"only {loop.trainer.steps} steps"
    assert AdapterRegistry(s.registry_dir).versions(), "nothing was published"
    assert loop.prequential.accuracy > 0.9, "the loop stopped learning somewhere along the way"

    # Memory: after warm-up, every sample within ±15 % of the level reached at the end of warm-up.
    settled = [rss for seen, rss in samples if WARM_UP * EVENTS <= seen < (WARM_UP + 0.05) * EVENTS]
    later = [(seen, rss) for seen, rss in samples if seen >= WARM_UP * EVENTS]
    assert len(settled) >= 3 and len(later) >= 20, f"too few memory samples ({len(samples)}) to judge"
    baseline = statistics.median(settled)
    trace = ", ".join(f"{seen}:{rss / 2**20:.0f}MiB" for seen, rss in later[:: max(1, len(later) // 25)])
    worst = max(later, key=lambda sample: abs(sample[1] - baseline))
    drift = (worst[1] - baseline) / baseline
    assert abs(drift) <= TOLERANCE, (
        f"RSS moved {drift:+.1%} from {baseline / 2**20:.0f} MiB (at {WARM_UP:.0%} of the stream) to "
        f"{worst[1] / 2**20:.0f} MiB at event {worst[0]}; trace (events:RSS): {trace}"
    )
    growth = later[-1][1] - baseline
    assert growth < MAX_GROWTH, f"RSS grew {growth / 2**20:.0f} MiB after warm-up; trace (events:RSS): {trace}"
    print(f"soak: {EVENTS} events in {elapsed:.0f} s, {loop.trainer.steps} steps; RSS {trace}")
