"""``python -m benchmarks --suite smoke|quick|full [--device cpu|cuda] [--only NAME ...] [--compile] [--out DIR]``.

Runs each benchmark beside its baseline, prints progress and each result as it comes in, then
the table, and writes ``<out>/<suite>-<device>.json`` and ``.md`` (default out:
``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.common import RESULTS, Result, fmt, markdown, on_checkpoint, progress, skipped, write

if TYPE_CHECKING:
    from benchmarks.plans import Plan

# Module names under benchmarks/, each with run(plan) -> list[Result], in the order they run.
BENCHMARKS = ["training", "swap", "serving", "tasks", "ingest", "memory", "replicas"]
# The quick suite must finish within 5 minutes on 2 cores: the replicas benchmark (a broker and
# three model processes, about a minute) runs there only when named, into its own results file.
ON_REQUEST = {"quick": {"replicas"}}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--suite", choices=["smoke", "quick", "full"], default="quick")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, help="run only these benchmarks")
    parser.add_argument("--compile", action="store_true", help="also time the bare peft loop under torch.compile")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON and Markdown results go")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--device cuda, but torch {torch.__version__} sees no CUDA device "
            f"(torch.version.cuda = {torch.version.cuda}); run with --device cpu or on a GPU machine"
        )
    from benchmarks.common import quiet
    from benchmarks.plans import make_plan

    quiet()
    started = time.time()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    results: list[Result] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="dynft-bench-") as workdir:
        plan = make_plan(args.suite, device, Path(workdir), args.compile)
        progress(f"suite {plan.suite} on {device}: serving model {plan.model}")
        pending = list(args.only or [b for b in BENCHMARKS if b not in ON_REQUEST.get(args.suite, set())])
        for name in list(pending):
            progress(f"running {name} ...")
            on_checkpoint(
                lambda partial, done=list(results): write(
                    args.out, args.suite, device, done + partial, started, _notes(plan, load_at_start, pending)
                )
            )
            try:
                module_results = importlib.import_module(f"benchmarks.{name}").run(plan)
            except Exception as exc:  # one broken benchmark must not cost the others' results
                traceback.print_exc()
                failed.append(name)
                module_results = [skipped(name, f"error: {type(exc).__name__}: {str(exc)[-300:]}")]
            for result in module_results:
                results.append(result)
                progress(f"  {_line(result)}")
            pending.remove(name)
            # After every benchmark: a run cut off by a time limit keeps what it measured so far.
            write(args.out, args.suite, device, results, started, _notes(plan, load_at_start, pending))
        on_checkpoint(None)
    json_path, md_path, data = write(args.out, args.suite, device, results, started, _notes(plan, load_at_start, []))
    print(markdown(data))
    progress(f"wrote {json_path} and {md_path}")
    if failed:
        progress(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


def _notes(plan: Plan, load_at_start: list[float], pending: list[str]) -> dict[str, Any]:
    notes: dict[str, Any] = {
        "suite": f"{plan.suite}; serving model {plan.model}; torch threads per contender {plan.threads}",
        "contenders": "each in a fresh spawned process" if plan.isolate else "in the harness process (smoke)",
        "load average at the start (1, 5, 15 min)": load_at_start,
        "cores": os.cpu_count(),
    }
    if pending:  # an intermediate file: what a cut-off run never reached
        notes["not yet run"] = ", ".join(pending)
    return notes


def _line(r: Result) -> str:
    if r.skipped:
        return f"{r.name}: skipped ({r.skipped})"
    ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
    return f"{r.name}: dynft {fmt(r.dynft)} vs {r.baseline_name} {fmt(r.baseline)} {r.unit} -> ratio {ratio}"


if __name__ == "__main__":
    sys.exit(main())
