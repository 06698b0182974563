"""Shared pieces of the benchmark harness: results, timing, machine description."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


@dataclass
class Result:
    """One comparison: dynft's figure, the baseline's, their ratio, and whether the goal is met."""

    name: str
    metric: str  # what the figures measure, with their unit
    dynft: float
    baseline: float
    baseline_name: str
    higher_is_better: bool = True
    goal: str = ""
    met: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        if self.higher_is_better:
            return self.dynft / self.baseline if self.baseline else float("inf")
        return self.baseline / self.dynft if self.dynft else float("inf")


def machine(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "device": device,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def timed(fn: Callable[[], Any], repeat: int, warmup: int = 3, sync: Callable[[], None] = lambda: None) -> list[float]:
    """Seconds per call of ``fn`` over ``repeat`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - started)
    return out


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def write(suite: str, device: str, results: list[Result], started: float) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{suite}-{device}"
    data = {
        "suite": suite,
        "machine": machine(device),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 1),
        "results": [{**asdict(r), "ratio": r.ratio} for r in results],
    }
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    md_path.write_text(markdown(data) + "\n")
    return json_path, md_path


def markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    where = m.get("gpu") or f"{m['cpus']}-core CPU"
    lines = [
        f"# Benchmarks: {data['suite']} suite on {where}",
        "",
        f"`python -m benchmarks --suite {data['suite']} --device {m['device']}`, finished {data['finished_at']} "
        f"in {data['seconds']} s (torch {m['torch']}, Python {m['python']}).",
        "",
        "| benchmark | metric | dynft | baseline | ratio | goal | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        lines.append(
            f"| {r['name']} | {r['metric']} | {r['dynft']:.4g} | {r['baseline']:.4g} ({r['baseline_name']}) "
            f"| {r['ratio']:.2f} | {r['goal']} | {met} |"
        )
    details = [r for r in data["results"] if r["details"]]
    if details:
        lines += ["", "Details:", ""]
        for r in details:
            lines.append(f"- **{r['name']}**: " + ", ".join(f"{k} = {v}" for k, v in r["details"].items()))
    return "\n".join(lines)
