"""The drift table: ``python -m benchmarks.quality.drift --suite quick|full [--streams a,b] [--workers N]``.

dynft's real training loop (as the ``dynft`` method of the quality benchmark, shipped drift
settings: every detector on, the default reactions) runs on every stream of the suite; each
detection is placed on the stream by the event that triggered it. Per stream and per detector
(the error, loss, label and representation streams): the delay of the first detection within
``HORIZON`` events after each drift point (and before the next), and the false alarms (every
other detection). Goal: each drift point detected by at least one detector within ``HORIZON``
events, at most one false alarm per stream over all detectors. For the concept stream (same
inputs, new labels) it also reports whether the trainer's accuracy came back to its level
before the drift point (item 3 of issue #17): the rolling accuracy over the last ``window``
events of the stream against the ``window`` events before the drift point.

Beside the detections, how much each drift point changes what a detector can see, with no
model at all (``change_at``): the label mix and the text length over the ``HORIZON`` events
on each side, each against what two random halves of those events differ by (a permutation
test). A drift point where neither rises above that noise cannot be told from no drift by
the label and input detectors; only the model's errors can show it.

Writes ``drift-<suite>.md`` and ``.json`` under ``benchmarks/results/quality/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from benchmarks.quality import scores
from benchmarks.quality.args import known_names, one_or_more
from benchmarks.quality.harness import quiet
from benchmarks.quality.methods import Run, run_dynft
from benchmarks.quality.streams import DATA, Stream, build
from benchmarks.quality.suites import SUITES, Suite

HORIZON = 100  # events after a drift point within which a detection counts (the goal)
DETECTORS = ("error", "loss", "label", "input", "representation")
SHUFFLES = 1000  # random splits that give the noise level of ``change_at``
RESULTS = Path(__file__).parents[1] / "results" / "quality"


def table_row(run: Run, stream: Stream, horizon: int) -> dict[str, Any]:
    """Delays and false alarms per detector, and over all of them."""
    end = len(stream.events)
    out: dict[str, Any] = {}
    for name in (*DETECTORS, "any"):
        hits = [d for d in run.detections if name in ("any", d["stream"])]
        out[name] = scores.detection(Run(run.stream, run.method, detections=hits), stream.drift_points, horizon, end)
    return out


def label_distance(a: list[str], b: list[str]) -> float:
    """Total-variation distance between the label mixes of ``a`` and ``b``."""
    ca, cb = Counter(a), Counter(b)
    return 0.5 * sum(abs(ca[k] / len(a) - cb[k] / len(b)) for k in ca.keys() | cb.keys())


def length_gap(a: list[str], b: list[str]) -> float:
    """Difference of the mean text length (characters) of ``b`` and ``a``, absolute."""
    return abs(sum(map(len, b)) / len(b) - sum(map(len, a)) / len(a))


def change_at(stream: Stream, point: int, horizon: int, seed: int = 0) -> dict[str, Any]:
    """The label mix's and the text length's change over ``horizon`` events on each side of
    ``point``, each with the 95th percentile of the same measure between random halves of those
    events (the change two samples of one distribution show)."""
    before = stream.events[max(0, point - horizon) : point]
    after = stream.events[point : point + horizon]
    rng, both = random.Random(seed), before + after
    out: dict[str, Any] = {"point": point}
    for name, measure, pick in (("label", label_distance, 1), ("length", length_gap, 0)):
        values = [row[pick] for row in both]
        noise = []
        for _ in range(SHUFFLES):
            rng.shuffle(values)
            noise.append(measure(values[: len(before)], values[len(before) :]))
        observed = measure([row[pick] for row in before], [row[pick] for row in after])
        out[name] = round(observed, 3)
        out[f"{name}_noise95"] = round(sorted(noise)[int(0.95 * SHUFFLES)], 3)
    return out


def concept_recovery(run: Run, stream: Stream, window: int) -> dict[str, float | None]:
    """Accuracy over the ``window`` prequential events before the first drift point, and over the last ``window``."""
    point = stream.drift_points[0]
    before = [t == p for pos, t, p in zip(run.positions, run.truths, run.predictions, strict=True) if pos < point]
    pre = before[-window:]
    last = [t == p for t, p in zip(run.truths[-window:], run.predictions[-window:], strict=True)]
    return {
        "pre_drift_accuracy": sum(pre) / len(pre) if pre else None,
        "final_accuracy": sum(last) / len(last) if last else None,
        "recovery_events": scores.recovery(run, stream.drift_points, window)[0],
    }


def measure(name: str, suite: Suite, data: Path) -> dict[str, Any]:
    import torch

    torch.set_num_threads(suite.threads)
    stream = build(name, suite.sizes, data)
    cpu = time.process_time()
    run = run_dynft(stream, suite, "dynft")
    result: dict[str, Any] = {
        "stream": name,
        "kind": stream.kind,
        "events": len(stream.events),
        "drift_points": stream.drift_points,
        "detections": run.detections,
        "table": table_row(run, stream, HORIZON),
        "changes": [change_at(stream, point, HORIZON) for point in stream.drift_points],
        "prequential_accuracy": scores.accuracy(run),
        "reactions": run.extra.get("drift_reactions", {}),
        "cpu_seconds": round(time.process_time() - cpu, 1),
    }
    if name == "concept":
        result["concept"] = concept_recovery(run, stream, suite.window)
    return result


def cell(row: dict[str, Any]) -> str:
    delays = ", ".join("missed" if d is None else str(d) for d in row["delays"])
    return f"{delays}; {row['false_alarms']} false"


def goals(result: dict[str, Any]) -> tuple[bool, bool]:
    """(every drift point detected within the horizon by some detector, at most one false alarm)."""
    detected = all(d is not None for d in result["table"]["any"]["delays"])
    return detected, result["table"]["any"]["false_alarms"] <= 1


def markdown(results: list[dict[str, Any]], suite: Suite, seconds: float, command: str, load: str) -> str:
    lines = [
        f"# Drift detection: {suite.name} suite",
        "",
        f"`{command}`: {seconds:.0f} s on {os.cpu_count()}-core CPU, Python {platform.python_version()}, "
        f"finished {datetime.now(UTC).isoformat(timespec='seconds')}; load average at the start {load}.",
        "",
        f"Per detector: delay (events) of the first detection within {HORIZON} events after each drift point;",
        "false alarms: every other detection. *any*: all detectors together (the goal: every drift point",
        "detected, at most one false alarm per stream).",
        "",
        "| stream | drift points | " + " | ".join(DETECTORS) + " | any | detected | <= 1 false alarm |",
        "|---|---|" + "---|" * (len(DETECTORS) + 3),
    ]
    for r in results:
        detected, quiet_enough = goals(r)
        cells = " | ".join(cell(r["table"][name]) for name in (*DETECTORS, "any"))
        points = ", ".join(map(str, r["drift_points"]))
        lines.append(
            f"| {r['stream']} | {points} | {cells} | {'yes' if detected else '**no**'} | "
            f"{'yes' if quiet_enough else '**no**'} |"
        )
    lines += [
        "",
        f"What changes at each drift point, over the {HORIZON} events on each side, against the 95th percentile "
        f"of the same measure between random halves of those events ({SHUFFLES} shuffles): the label mix's "
        "total-variation distance and the mean text length's gap (characters). A change under both noise "
        "levels is invisible to the label and input detectors.",
        "",
        "| stream | drift point | label mix (noise 95%) | text length (noise 95%) |",
        "|---|---|---|---|",
    ]
    for r in results:
        for c in r.get("changes", []):
            lines.append(
                f"| {r['stream']} | {c['point']} | {c['label']:.3f} ({c['label_noise95']:.3f}) | "
                f"{c['length']:.1f} ({c['length_noise95']:.1f}) |"
            )
    lines += ["", "| stream | prequential accuracy | reactions | CPU s |", "|---|---|---|---|"]
    for r in results:
        reactions = ", ".join(f"{k} {v}" for k, v in r["reactions"].items())
        lines.append(f"| {r['stream']} | {100 * r['prequential_accuracy']:.1f} | {reactions} | {r['cpu_seconds']} |")
    concept = next((r["concept"] for r in results if "concept" in r), None)
    if concept is not None:
        pre, final = concept["pre_drift_accuracy"], concept["final_accuracy"]
        lines += [
            "",
            f"Concept stream (labels permuted at the drift point): accuracy over the {suite.window} events before "
            f"the drift point {100 * (pre or 0):.1f}, over the last {suite.window} events {100 * (final or 0):.1f}; "
            f"recovery: {concept['recovery_events'] if concept['recovery_events'] is not None else 'never'} events.",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.drift", description=__doc__)
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--streams", default=None, help="comma-separated subset of the suite's streams")
    parser.add_argument("--workers", type=one_or_more, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.streams:
        known_names(parser, "--streams", args.streams.split(","), list(SUITES[args.suite].streams))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    suite = SUITES[args.suite]
    names = args.streams.split(",") if args.streams else list(suite.streams)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    started = time.time()
    pool = ProcessPoolExecutor(max(1, args.workers), mp_context=get_context("spawn"), initializer=quiet)
    with pool:
        results = list(pool.map(measure, names, [suite] * len(names), [DATA] * len(names)))
    command = f"python -m benchmarks.quality.drift --suite {args.suite}" + (
        f" --streams {args.streams}" if args.streams else ""
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"drift-{suite.name}"
    stem.with_suffix(".md").write_text(markdown(results, suite, time.time() - started, command, load))
    stem.with_suffix(".json").write_text(json.dumps({"suite": suite.name, "horizon": HORIZON, "streams": results}))
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
