"""``python -m benchmarks --suite quick|full [--device cpu|cuda] [--only NAME ...]``.

Runs each benchmark beside its baseline, prints a table as results come in, and writes
``benchmarks/results/<suite>-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

from benchmarks.common import Result, markdown, write

BENCHMARKS = ["ingest"]  # module names under benchmarks/, each with run(suite, device) -> list[Result]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--suite", choices=["quick", "full"], default="quick")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, help="run only these benchmarks")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    started = time.time()
    results: list[Result] = []
    for name in args.only or BENCHMARKS:
        print(f"[{time.time() - started:6.1f}s] running {name} ...", file=sys.stderr, flush=True)
        module = importlib.import_module(f"benchmarks.{name}")
        for result in module.run(args.suite, device):
            results.append(result)
            print(
                f"[{time.time() - started:6.1f}s]   {result.name}: dynft {result.dynft:.4g} vs "
                f"{result.baseline_name} {result.baseline:.4g} {result.metric} -> ratio {result.ratio:.2f}",
                file=sys.stderr,
                flush=True,
            )
    json_path, md_path = write(args.suite, device, results, started)
    print(
        markdown(
            {
                "suite": args.suite,
                "machine": __import__("benchmarks.common").common.machine(device),
                "finished_at": "now",
                "seconds": round(time.time() - started, 1),
                "results": [{**r.__dict__, "ratio": r.ratio} for r in results],
            }
        )
    )
    print(f"\nwrote {json_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
