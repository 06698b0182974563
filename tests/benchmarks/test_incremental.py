"""A benchmark run cut off part-way keeps what it measured: the harness writes after every benchmark.

The GPU suite runs under a time limit (``benchmarks/gpu/run.sh``); a run killed by it must leave
well-formed results of every benchmark that finished, saying which did not run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import common
from benchmarks.common import Result

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_run_killed_after_its_first_benchmark_keeps_that_benchmarks_results(tmp_path: Path) -> None:
    result, log = tmp_path / "smoke-cpu.json", tmp_path / "harness.log"
    args = ["--suite", "smoke", "--device", "cpu", "--only", "swap", "serving", "--out", str(tmp_path)]
    with log.open("w") as stderr:
        harness = subprocess.Popen(
            [sys.executable, "-m", "benchmarks", *args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,  # its children (servers) are killed with it
        )
        deadline = time.monotonic() + 600
        try:
            while not result.exists() and harness.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            with contextlib.suppress(ProcessLookupError):  # cut off, like a device call past its time limit
                os.killpg(harness.pid, signal.SIGKILL)
            harness.wait()
    assert result.exists(), (harness.returncode, log.read_text()[-4000:])

    data = json.loads(result.read_text())
    names = [r["name"] for r in data["results"]]
    assert any(n.startswith("hot swap") for n in names), names
    assert not any("under training" in n or n.startswith("freshness") for n in names), names  # serving's rows
    assert data["notes"]["not yet run"] == "serving"
    assert not list(tmp_path.glob(".*.tmp"))  # only whole files under their final names


def test_a_checkpoint_inside_a_benchmark_is_written_with_the_results_before_it() -> None:
    written: list[list[str]] = []
    before = [Result("earlier", "m", "u", 1.0, 1.0, "b")]
    common.on_checkpoint(lambda partial: written.append([r.name for r in before + partial]))
    try:
        common.checkpoint([Result("case 1", "m", "u", 2.0, 1.0, "b")])
    finally:
        common.on_checkpoint(None)
    common.checkpoint([Result("case 2", "m", "u", 2.0, 1.0, "b")])  # no harness listening: nothing written
    assert written == [["earlier", "case 1"]]
