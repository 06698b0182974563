"""``python -m benchmarks.quality --suite quick|full [--workers N] [--rate R | --no-served] [--out DIR]
[--multitask-seeds N] [--only-multitask]``.

First the multitask stream (``benchmarks.quality.multitask``: four tasks in one stream, a daemon
per task against ``per_task``, ``shared``, one flat label space and river), then the rest.

Runs every method on every drifting stream and the fine-tuning comparison, then, for every
stream, the served protocol (``benchmarks.quality.served``: a real ``dynft run`` fed at ``rate``
events/s, scored on what its server answered), one stream at a time after the suite so that
the daemon has the machine to itself. Writes ``quality-<suite>.md``, ``.json`` and one PNG per
stream under ``benchmarks/results/quality/``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from benchmarks.quality import multitask, report, served
from benchmarks.quality.args import count, one_or_more, positive
from benchmarks.quality.harness import run_suite
from benchmarks.quality.streams import DATA, build
from benchmarks.quality.suites import SUITES, Suite

RESULTS = Path(__file__).parents[1] / "results" / "quality"


def add_served(results: dict[str, Any], suite: Suite, rate: float, logs: Path) -> None:
    """Run the served protocol on every stream of ``results``; its scores go beside the methods'."""
    for name, stream_results in results["streams"].items():
        stream = build(name, suite.sizes, DATA)
        events = len(stream.events)
        print(f"served: {name}, {events} events at {rate} events/s", file=sys.stderr, flush=True)
        answers = served.serve(stream, suite, rate, events, logs)
        scored = served.score(stream, suite, answers, events, compare=False)
        positions = stream_results.get("dynft_positions")
        if positions:
            truths = [label for _, label in stream.events]
            scored["served on dynft's events"] = served.rounded(
                served.on_positions(truths, answers["answers"], positions)
            )
        stream_results["served"] = scored | {"rate": rate}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__)
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--workers", type=one_or_more, default=min(2, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--rate", type=positive, default=20.0, help="served protocol: events per second fed")
    parser.add_argument("--no-served", action="store_true", help="skip the served protocol")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--multitask-seeds", type=count, default=3, help="seeds of the multitask stream (0: skip it)")
    parser.add_argument("--only-multitask", action="store_true", help="run the multitask stream only")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    suite = SUITES[args.suite]
    command = f"python -m benchmarks.quality {' '.join(sys.argv[1:])}".strip()
    if args.multitask_seeds > 0:  # first: the one-process-per-job pool must not run beside the suite's
        outcome = multitask.run_multitask(suite, args.multitask_seeds, args.workers)
        for path in multitask.write(outcome, args.out, command):
            print(f"wrote {path}", file=sys.stderr)
    if args.only_multitask:
        return 0
    results = run_suite(suite, args.workers)
    if not args.no_served:
        add_served(results, suite, args.rate, args.out / "logs")
    results = report.complete(results)
    for path in report.write(results, args.out, command):
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
