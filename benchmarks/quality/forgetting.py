"""The forgetting table: replay alone against replay with each penalty, on the class-incremental streams.

``python -m benchmarks.quality.forgetting --suite quick|full [--workers N] [--streams banking]``

Each method is dynft's real training loop (``benchmarks.quality.methods``) on the stream:
replay alone (``dynft``), replay + the L2 anchor (``dynft + anchor``, ``trainer.anchor_weight``),
replay + learning without forgetting (``dynft + LwF``, ``trainer.lwf_weight``) and replay + EWC
(``dynft + EWC``, ``trainer.ewc_weight``). Scored by backward transfer (BWT: the mean over earlier
phases of final minus right-after-the-phase test accuracy; negative is forgetting) and the final
accuracy on each phase's test slice. Writes ``forgetting-<suite>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.quality.args import known_names, one_or_more
from benchmarks.quality.harness import Job, execute, quiet, summarize
from benchmarks.quality.methods import Run
from benchmarks.quality.streams import DATA, build
from benchmarks.quality.suites import LWF_WEIGHT, SUITES, Suite

RESULTS = Path(__file__).parents[1] / "results" / "quality"
METHODS = ("dynft", "dynft + anchor", "dynft + LwF", "dynft + EWC")
LABELS = {
    "dynft": "replay",
    "dynft + anchor": "replay + L2",
    "dynft + LwF": "replay + LwF",
    "dynft + EWC": "replay + EWC",
}


def run(suite: Suite, names: list[str], workers: int) -> dict[str, Any]:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    started = time.time()
    jobs = [Job("stream", name, method, 0.0) for name in names for method in METHODS]
    if workers <= 1:
        quiet()
        runs = [execute(job, suite, DATA) for job in jobs]
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=quiet) as pool:
            runs = list(pool.map(execute, jobs, [suite] * len(jobs), [DATA] * len(jobs)))
    out: dict[str, Any] = {"suite": suite.name, "seconds": round(time.time() - started, 1), "streams": {}}
    out["weights"] = {"anchor_weight": suite.anchor_weight, "ewc_weight": suite.anchor_weight, "lwf_weight": LWF_WEIGHT}
    for name in names:
        stream = build(name, suite.sizes, DATA)
        out["streams"][name] = {
            job.method: summarize(r, stream, suite)
            for job, r in zip(jobs, runs, strict=True)
            if job.target == name and isinstance(r, Run)
        }
    return out


def markdown(results: dict[str, Any], command: str, machine: str) -> str:
    w = results["weights"]
    lines = [
        f"# Forgetting, {results['suite']} suite",
        "",
        f"`{command}` — {machine}; {results['seconds']:.0f} s. Weights: anchor {w['anchor_weight']}, "
        f"EWC {w['ewc_weight']}, LwF {w['lwf_weight']}.",
        "",
    ]
    for name, methods in results["streams"].items():
        base = methods.get("dynft", {}).get("backward_transfer")
        base = None if base is None else round(base, 6)
        lines += [
            f"## {name}",
            "",
            "| method | preq. acc | BWT | BWT vs replay | final acc per phase |",
            "|---|---|---|---|---|",
        ]
        for method, r in methods.items():
            bwt = None if r["backward_transfer"] is None else round(r["backward_transfer"], 6) + 0.0  # no "-0.000"
            better = "-" if bwt is None or not base else f"{(bwt - base) / abs(base):+.0%}"
            finals = " / ".join(f"{x:.2f}" for x in r["final_accuracy"])
            lines.append(
                f"| {LABELS[method]} | {r['prequential_accuracy']:.3f} | "
                f"{'-' if bwt is None else f'{bwt:+.3f}'} | {better} | {finals} |"
            )
        lines.append("")
    lines.append(
        "*BWT vs replay*: the relative change of BWT against replay alone (positive: less forgetting). "
        "One seed; test slices of a few texts per intent, so differences of a few points are within noise."
    )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.forgetting", description=__doc__)
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--workers", type=one_or_more, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--streams", default="", help="comma-separated (default: the suite's class-incremental ones)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    suite = SUITES[args.suite]
    known_names(parser, "--streams", [n for n in args.streams.split(",") if n], list(suite.streams))
    names = [n for n in args.streams.split(",") if n] or [
        n for n in suite.streams if build(n, suite.sizes, DATA).kind == "class-incremental"
    ]
    machine = f"{os.cpu_count()}-core CPU, load {os.getloadavg()[0]:.1f} at the start"
    results = run(suite, names, args.workers)
    command = "python -m benchmarks.quality.forgetting " + " ".join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"forgetting-{suite.name}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    stem.with_suffix(".md").write_text(markdown(results, command, machine), encoding="utf-8")
    print(markdown(results, command, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
