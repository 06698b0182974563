"""The multitask quality stream end to end on a tiny model and very short streams (no timings asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.quality import multitask
from benchmarks.quality.suites import QUICK


def test_the_stream_interleaves_four_tasks_and_permutes_one_half_way() -> None:
    rows = multitask.stream(40, 4, seed=1)
    calm = multitask.stream(40, 4, seed=1, drift=False)
    assert [r["id"] for r in rows] == [r["id"] for r in calm]  # the same events in the same order
    assert {r["task"] for r in rows} == set(multitask.TASKS)
    changed = [r for r, c in zip(rows, calm, strict=True) if r["label"] != c["label"]]
    assert changed and {r["task"] for r in changed} == {multitask.DRIFTING}
    topic = [r["id"] for r in calm if r["task"] == multitask.DRIFTING]
    assert min(topic.index(r["id"]) for r in changed) >= len(topic) // 2  # only the second half


def test_every_contender_runs_and_reports_each_task(tiny_model_dir: Path, tmp_path: Path) -> None:
    suite = QUICK.with_overrides(
        name="smoke", model_path=str(tiny_model_dir), max_length=16, multitask_per_task=24, multitask_intents=3
    )
    results = multitask.run_multitask(suite, seeds=1, workers=0)  # in this process: quicker
    paths = multitask.write(results, tmp_path, "test")

    data = json.loads(paths[0].read_text())
    assert [r["contender"] for r in data["runs"]] == list(multitask.CONTENDERS)
    for run in data["runs"]:
        assert set(run["accuracy"]) == set(multitask.TASKS), run["contender"]
        assert all(0.0 <= a <= 1.0 for a in run["accuracy"].values())
        assert all(n > 0 for n in run["scored"].values())
        assert run["cpu_s_per_event"] > 0 and run["peak_rss_mib"] > 0
    md = paths[1].read_text()
    assert all(f"| {c} |" in md for c in multitask.CONTENDERS)
    assert "costs the other tasks" in md
