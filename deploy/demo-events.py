#!/usr/bin/env python3
"""Print dynft events (JSON Lines with ids) from the packaged demo data, for the Compose quick start.

The demo file (12 intents of BANKING77, CC BY 4.0; see dynft/data/demo/README.md) has text and
label only, and events need an id, so each line gets ``<prefix>-<round>-<n>``. Standard library
only, so it runs on the host without dynft installed:

    python3 deploy/demo-events.py --repeat 3 | dynft produce - --topic events --bootstrap localhost:9094
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "dynft" / "data" / "demo" / "banking77-12.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="pass over the data this many times (default 1)")
    parser.add_argument("--prefix", default="b77", help="id prefix (default b77)")
    args = parser.parse_args()
    rows = [json.loads(line) for line in DEMO.read_text(encoding="utf-8").splitlines() if line.strip()]
    for round_ in range(args.repeat):
        for n, row in enumerate(rows):
            sys.stdout.write(json.dumps({"id": f"{args.prefix}-{round_}-{n}", **row}) + "\n")


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # the reader stopped early (`| head`): quiet, as the Python docs advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
