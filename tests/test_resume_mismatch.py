"""A restart whose adapter configuration no longer fits the checkpoint: real ``dynft train`` processes.

Three runs on one state directory and one growing file stream: rank 8, then rank 4 (the
checkpoint no longer fits: one warning naming the change, a new lineage that starts from the
serving version carried over to rank 4, the stream's position kept), then rank 4 again (the
checkpoint written by the second run fits: no warning). Each run must exit 0: before this, the
second run failed at startup on every restart.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from dynft.registry import AdapterRegistry
from dynft.settings import Settings

from helpers import keyword_events, write_jsonl

pytestmark = pytest.mark.slow
LABELS = ["alpha", "beta", "gamma"]


# The tiny model's fast settings, taken from the ``tiny_settings`` fixture.
FAST = ("model.max_length", "trainer.lr", "trainer.head_lr", "trainer.warmup_steps", "trainer.threads")


def train(state: Path, settings: Settings, stream: Path, rank: int) -> list[str]:
    """One ``dynft train`` to the end of ``stream``; its log lines."""
    values: dict[str, object] = {key: getattr(getattr(settings, key.split(".")[0]), key.split(".")[1]) for key in FAST}
    values.update({"adapter.r": rank, "source.exit_at_end": "true", "trainer.fresh_wait_s": 0.05})
    values.update({"registry.publish_every_steps": 10, "checkpoint.every_steps": 10})
    assignments = [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]
    model = str(settings.model.path)
    command = ["train", "--state-dir", str(state), "--model", model, "--source", f"file:{stream}"]
    done = subprocess.run(
        [sys.executable, "-m", "dynft", *command, *assignments], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr.splitlines()


def mismatch_warnings(lines: list[str]) -> list[str]:
    return [line for line in lines if " WARNING " in line and "does not fit this configuration" in line]


def test_a_changed_adapter_rank_warns_once_and_resumes_from_the_serving_version(
    tiny_settings: Settings, tmp_path: Path
) -> None:
    state, stream = tmp_path / "state", tmp_path / "events.jsonl"
    rows = keyword_events(240, LABELS, seed=1)
    write_jsonl(stream, rows)
    first = train(state, tiny_settings, stream, rank=8)
    assert mismatch_warnings(first) == []
    registry = AdapterRegistry(state / "registry")
    serving = registry.serving().version
    assert serving is not None
    old_versions = set(registry.versions())
    old_lineage = registry.meta(serving)["lineage"]

    more = keyword_events(96, LABELS, seed=2, prefix="m")
    write_jsonl(stream, rows + more)
    second = train(state, tiny_settings, stream, rank=4)
    warnings = mismatch_warnings(second)
    assert len(warnings) == 1, second
    assert "r 8 -> 4" in warnings[0]  # names what changed
    assert any(f"lineage {old_lineage + 1} starts from serving version {serving}" in line for line in second), second
    new_versions = sorted(set(registry.versions()) - old_versions)
    assert new_versions, "the second run published nothing"
    for version in new_versions:
        assert registry.meta(version)["lineage"] == old_lineage + 1
        config = json.loads((registry.path(version) / "adapter_config.json").read_text())
        assert config["r"] == 4
    newest, _ = registry.load(new_versions[-1])
    assert set(newest.labels) == set(LABELS)

    # The stream's position was kept: every event was delivered once, none again.
    with sqlite3.connect(state / "ledger.db") as db:
        seen = dict(db.execute("SELECT id, seen FROM events").fetchall())
    assert set(seen) == {r["id"] for r in rows + more}
    assert set(seen.values()) == {1}

    write_jsonl(stream, rows + more + keyword_events(16, LABELS, seed=3, prefix="n"))
    third = train(state, tiny_settings, stream, rank=4)
    assert mismatch_warnings(third) == []  # the checkpoint of the second run fits
    assert not any("starts from" in line for line in third)
