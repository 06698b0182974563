"""The benchmark harness runs end to end and writes well-formed results.

Only the shape of the results is checked, never a timing: figures depend on the machine.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROW_KEYS = {
    "name",
    "metric",
    "unit",
    "dynft",
    "baseline",
    "baseline_name",
    "ratio",
    "higher_is_better",
    "goal",
    "met",
    "skipped",
    "details",
}
EXPECTED = (
    "trainer throughput",
    "trainer step rate between publishes",
    "LoRA step MFU",
    "hot swap, the part that blocks requests",
    "hot swap from the version directory",
    "predict throughput at 1 swap(s)/s",
    "predict throughput at 50 swap(s)/s",
    "predict p99 latency under training",
    "predict throughput under training",
    "freshness p50",
    "freshness p95",
    "throughput over 8 tasks",
    "kafka ingest",
)


def harness(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.slow
def test_smoke_suite_runs_every_benchmark_and_writes_well_formed_results(tmp_path: Path) -> None:
    run = harness("--suite", "smoke", "--device", "cpu", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr[-4000:]
    assert "ratio" in run.stderr  # progress lines as results come in

    data = json.loads((tmp_path / "smoke-cpu.json").read_text())  # strict JSON: no NaN
    assert data["suite"] == "smoke"
    assert data["machine"]["device"] == "cpu"
    assert is_number(data["seconds"])
    rows = data["results"]
    names = [r["name"] for r in rows]
    assert len(names) == len(set(names))
    for prefix in EXPECTED:
        assert any(n.startswith(prefix) for n in names), f"no result row for {prefix!r}: {names}"

    for row in rows:
        assert set(row) == ROW_KEYS, row["name"]
        assert isinstance(row["name"], str) and isinstance(row["details"], dict)
        if row["skipped"] is not None:
            assert not row["skipped"].startswith("error"), row
            assert row["dynft"] is None and row["baseline"] is None and row["ratio"] is None
            continue
        assert row["unit"] and row["metric"] and row["baseline_name"]
        assert isinstance(row["higher_is_better"], bool)
        assert row["met"] in (True, False, None)
        for key in ("dynft", "baseline", "ratio"):
            assert row[key] is None or is_number(row[key]), (row["name"], key, row[key])
        if is_number(row["dynft"]) and is_number(row["baseline"]) and row["dynft"] and row["baseline"]:
            num, den = (row["dynft"], row["baseline"]) if row["higher_is_better"] else (row["baseline"], row["dynft"])
            assert row["ratio"] == pytest.approx(num / den), row["name"]

    # Every row that could be measured here was: the trainer, swap and serving figures are numbers.
    measured = [r for r in rows if r["name"].startswith((*EXPECTED[:8], "throughput over 8 tasks"))]
    assert all(is_number(r["dynft"]) and is_number(r["baseline"]) for r in measured), measured
    ingest = next(r for r in rows if r["name"] == "kafka ingest")
    assert ingest["skipped"]  # the smoke suite starts no broker, and says so

    md = (tmp_path / "smoke-cpu.md").read_text()
    assert md.startswith("# Benchmarks: smoke suite")
    assert all(name in md for name in names)


def test_cuda_without_a_gpu_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run = harness("--suite", "smoke", "--device", "cuda", "--out", str(tmp_path), timeout=300)
    assert run.returncode == 2
    assert "no CUDA device" in run.stderr
    assert not list(tmp_path.iterdir())
