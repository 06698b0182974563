"""Runs a suite: every (stream, method) and (dataset, fine-tuning configuration) is one job.

Jobs run in ``workers`` spawned processes of one torch thread each (two small processes use
two cores better than one process with two threads), longest first; with ``workers=1`` they
run in this process. The results are plain data, ready for ``report``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from benchmarks.quality import paradigms, scores
from benchmarks.quality.methods import METHODS, Run, run_method
from benchmarks.quality.streams import DATA, Stream, build
from benchmarks.quality.suites import Suite, dynft_overrides

COST = {  # rough training rows per stream event, to start the longest jobs first
    "dynft": 2.0,
    "dynft + anchor": 2.0,
    "dynft no replay": 1.0,
    "static": 0.6,
    "periodic retrain": 2.5,
}
PARADIGM_COST = {"full fine-tuning": 1.6, "head only": 0.5}


@dataclass(frozen=True)
class Job:
    kind: str  # "stream" or "paradigm"
    target: str  # stream or dataset name
    method: str  # method or fine-tuning configuration
    cost: float


def plan(suite: Suite, streams: dict[str, Stream]) -> list[Job]:
    jobs = [
        Job("stream", name, method, COST.get(method, 0.01) * len(stream.events))
        for name, stream in streams.items()
        for method in METHODS
        if method != "dynft + anchor" or name in suite.anchor_streams
    ]
    jobs += [
        Job("paradigm", dataset, config, PARADIGM_COST.get(config, 1.0) * suite.paradigm_train)
        for dataset in suite.paradigm_datasets
        for config in paradigms.CONFIGS
    ]
    return sorted(jobs, key=lambda j: -j.cost)


def quiet() -> None:
    """Worker set-up: offline, one thread, no progress bars or library chatter."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("dynft").setLevel(logging.ERROR)


def execute(job: Job, suite: Suite, data: Path) -> Run | dict[str, Any]:
    import torch

    torch.set_num_threads(suite.threads)
    cpu = time.process_time()
    if job.kind == "paradigm":
        row = paradigms.run_paradigm(job.target, job.method, suite, data)
        row["cpu_seconds"] = time.process_time() - cpu
        return row
    run = run_method(build(job.target, suite.sizes, data), suite, job.method)
    run.extra["cpu_seconds"] = time.process_time() - cpu  # every thread of this process, test-slice scoring included
    return run


def run_suite(
    suite: Suite, workers: int, data: Path = DATA, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run every job of ``suite``; returns the results as plain data."""
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    started = time.time()
    streams = {name: build(name, suite.sizes, data) for name in suite.streams}
    jobs = plan(suite, streams)
    say(f"{len(jobs)} jobs on {workers} worker(s)")
    outcomes: dict[Job, Run | dict[str, Any]] = {}
    if workers <= 1:
        for job in jobs:
            outcomes[job] = execute(job, suite, data)
            say(f"[{time.time() - started:6.1f}s] {job.target} / {job.method}")
    else:
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=quiet)
        with pool:
            futures: dict[Future[Run | dict[str, Any]], Job] = {
                pool.submit(execute, job, suite, data): job for job in jobs
            }
            for future in as_completed(futures):
                job = futures[future]
                outcomes[job] = future.result()
                say(f"[{time.time() - started:6.1f}s] {job.target} / {job.method}")
    return assemble(suite, streams, outcomes, time.time() - started, workers)


def cpu_seconds(outcome: Run | dict[str, Any]) -> float:
    return float(outcome.extra["cpu_seconds"] if isinstance(outcome, Run) else outcome["cpu_seconds"])


def summarize(run: Run, stream: Stream, suite: Suite) -> dict[str, Any]:
    return scores.summarize(run, stream.drift_points, suite.window, suite.detection_horizon, len(stream.events))


def assemble(
    suite: Suite, streams: dict[str, Stream], outcomes: dict[Job, Run | dict[str, Any]], seconds: float, workers: int
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "suite": suite.name,
        "seconds": round(seconds, 1),
        "workers": workers,
        "cpu_seconds": round(sum(cpu_seconds(r) for r in outcomes.values()), 1),
        "settings": dynft_overrides(suite, "dynft") | {"trainer.anchor_weight (dynft + anchor)": suite.anchor_weight},
        "suite_config": {k: v for k, v in vars(suite).items() if k not in ("sizes", "extra_settings")},
        "sizes": vars(suite.sizes),
        "streams": {},
        "paradigms": [],
    }
    for name, stream in streams.items():
        runs = {job.method: r for job, r in outcomes.items() if job.target == name and isinstance(r, Run)}
        out["streams"][name] = {
            "kind": stream.kind,
            "events": len(stream.events),
            "phases": [{"name": p.name, "start": p.start, "test": len(p.test)} for p in stream.phases],
            "drift_points": stream.drift_points,
            "methods": {m: summarize(runs[m], stream, suite) for m in METHODS if m in runs},
            "curves": {m: scores.curve(runs[m], suite.window, max(1, suite.window // 5)) for m in METHODS if m in runs},
            "detections": {m: runs[m].detections for m in METHODS if m in runs and runs[m].detections},
            # The events dynft's trainer scored (not those held out for its gate): served accuracy is
            # compared with its prequential accuracy on these.
            "dynft_positions": runs["dynft"].positions if "dynft" in runs else None,
        }
    rows = [r for job, r in outcomes.items() if job.kind == "paradigm" and isinstance(r, dict)]
    order = {(d, c): i for i, (d, c) in enumerate((d, c) for d in suite.paradigm_datasets for c in paradigms.CONFIGS)}
    out["paradigms"] = sorted(rows, key=lambda r: order[(r["dataset"], r["config"])])
    return out
