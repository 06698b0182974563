"""``python -m benchmarks.quality --suite quick|full [--workers N] [--out DIR]``.

Runs every method on every drifting stream and the fine-tuning comparison, then writes
``quality-<suite>.md``, ``.json`` and one PNG per stream under ``benchmarks/results/quality/``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from benchmarks.quality import report
from benchmarks.quality.harness import run_suite
from benchmarks.quality.suites import SUITES

RESULTS = Path(__file__).parents[1] / "results" / "quality"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__)
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    suite = SUITES[args.suite]
    results = report.complete(run_suite(suite, args.workers))
    command = f"python -m benchmarks.quality --suite {args.suite}"
    for path in report.write(results, args.out, command):
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
