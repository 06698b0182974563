"""Serving under training, and freshness: the layout of ``dynft run`` on one machine.

The trainer (``TrainingLoop``, co-located: it takes the cores the server leaves) runs in its
own process and follows a JSON Lines file that this process appends demo events to at a steady
rate; the inference engine runs here under a closed-loop predict load (the path of every
``/v1/predict`` after JSON parsing; HTTP is left out). The registry between them is the real
one: the trainer publishes through its gate, the engine's watcher picks versions up.

- Serving under training: predict latency and throughput while the trainer trains, against the
  same load after the trainer has stopped (same engine, same device).
- Freshness: for each event, from its arrival (appended and flushed) to the first answer
  served by a version that trained on it. A version's ``meta.json`` records ``events_seen``,
  the number of fresh events trained so far; the trainer trains the file's events in order, so
  the k-th trained event is in every version with ``events_seen >= k``. The baseline is the
  moment the trainer's weights first include the event (its step done): freshness beyond it
  is publishing cadence, gate, registry write, watcher poll, load and flip.

The trainer runs with the shipped publishing settings: a version right after each step that
trained new events (a quick gate check, ``registry.publish_fresh``), a full check every 20 s.
The file starts with 64 held-out events, so the gate judges from the first candidate on instead
of refusing until enough arrive. An event that arrived while serving was timed, at least
``SETTLE_S`` before the load stopped, and was never served counts as never served (infinitely
late) in the percentiles.
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Result, exit_now, median, percentile, progress, quiet, rounded
from benchmarks.loadgen import Load, LoadGenerator
from benchmarks.plans import Plan
from benchmarks.streams import demo_events, held_out_ids, with_ids, write_jsonl

HOLDOUT = 64
SETTLE_S = 10.0  # events arriving later than this before the load stops may not be served by then


def train_side(overrides: dict[str, Any], stop: Any, started: Any, steps_path: str) -> None:
    """The trainer process: the daemon's training service until ``stop`` is set; its steps go to a file."""
    quiet()
    from dynft.loop import TrainingLoop
    from dynft.settings import load_settings

    loop = TrainingLoop(load_settings(overrides=overrides), colocated=True)
    steps: list[tuple[float, float, int, bool]] = []  # (start, end, fresh rows, skipped)
    publishes: list[tuple[float, float]] = []
    loop.startup()
    step, publish = loop.trainer.step, loop.publisher.maybe_publish

    def timed_step(batch: Any) -> Any:
        begun = time.time()
        result = step(batch)
        steps.append((begun, time.time(), batch.n_fresh, result.skipped is not None))
        return result

    def timed_publish(*args: Any, **kwargs: Any) -> Any:
        begun = time.time()
        version = publish(*args, **kwargs)
        if version is not None:
            publishes.append((begun, time.time()))
        return version

    loop.trainer.step = timed_step  # type: ignore[method-assign]
    loop.publisher.maybe_publish = timed_publish  # type: ignore[method-assign]

    def stopper() -> None:
        stop.wait()
        loop.should_exit.set()

    threading.Thread(target=stopper, daemon=True).start()
    started.set()
    try:
        loop.main_loop()
    finally:
        loop.shutdown()
        Path(steps_path).write_text(json.dumps({"steps": steps, "publishes": publishes}))


def train_process(overrides: dict[str, Any], stop: Any, started: Any, steps_path: str) -> None:
    """``train_side`` as a process of its own; it ends without interpreter teardown (see ``common.exit_now``)."""
    try:
        train_side(overrides, stop, started, steps_path)
    finally:
        exit_now()


class Writer(threading.Thread):
    """Appends events to the trainer's file at ``rate`` per second; remembers when each arrived."""

    def __init__(self, path: Path, rate: float) -> None:
        super().__init__(daemon=True)
        self.path, self.rate = path, rate
        self.arrivals: list[tuple[str, float]] = []
        self.texts: dict[str, str] = {}  # by id: the hold-out hash covers the text
        self.halt = threading.Event()

    def run(self) -> None:
        events = iter(demo_events(10**6, seed=5))
        started = time.perf_counter()
        with open(self.path, "a", encoding="utf-8") as fh:
            while not self.halt.is_set():
                due = int((time.perf_counter() - started) * self.rate) + 1 - len(self.arrivals)
                for _ in range(max(0, due)):
                    event = next(events)
                    fh.write(json.dumps(event) + "\n")
                    fh.flush()
                    self.arrivals.append((event["id"], time.time()))
                    self.texts[event["id"]] = event["text"]
                self.halt.wait(min(0.05, 1 / self.rate))


def measure(plan: Plan) -> dict[str, Any]:
    """The whole scenario; runs in its own process (the trainer in a child of it)."""
    quiet()
    import torch
    from prometheus_client import CollectorRegistry

    from dynft.evaluation import is_held_out
    from dynft.metrics import ServerMetrics
    from dynft.registry import AdapterRegistry
    from dynft.serving.engine import InferenceEngine
    from dynft.settings import load_settings

    with tempfile.TemporaryDirectory() as tmp:
        events_path = Path(tmp) / "events.jsonl"
        held = demo_events(HOLDOUT, seed=6)
        held = with_ids(held, held_out_ids(held, 0.1))
        write_jsonl(events_path, held)
        overrides = {
            "state_dir": str(Path(tmp) / "state"),
            "model.path": plan.model_path,
            "model.device": plan.device,
            "source.uri": f"file:{events_path}",
            "source.follow": True,
            "source.poll_interval_s": 0.05,
            "registry.keep_last": 10_000,
        }
        settings = load_settings(overrides=overrides)
        registry = AdapterRegistry(settings.registry_dir, keep_last=10_000)
        metrics_registry = CollectorRegistry()
        engine = InferenceEngine(settings, registry, ServerMetrics(metrics_registry))
        torch.set_num_threads(settings.server.threads)
        steps_path = str(Path(tmp) / "steps.json")
        if plan.isolate:
            ctx = multiprocessing.get_context("spawn")
            stop: Any = ctx.Event()
            started: Any = ctx.Event()
            trainer: Any = ctx.Process(target=train_process, args=(overrides, stop, started, steps_path))
        else:  # smoke: a thread, to stay fast
            stop, started = threading.Event(), threading.Event()
            trainer = threading.Thread(target=train_side, args=(overrides, stop, started, steps_path), daemon=True)
        trainer.start()
        engine.start()
        writer = Writer(events_path, plan.serve_event_rate)
        try:
            deadline = time.monotonic() + 300
            while not started.wait(0.5):
                if time.monotonic() > deadline or not trainer.is_alive():
                    raise RuntimeError("the trainer did not start (within 300 s)")
            writer.start()
            deadline = time.monotonic() + 300
            while not engine.ready:
                if time.monotonic() > deadline or not trainer.is_alive():
                    raise RuntimeError("no adapter version was served within 300 s of the trainer's start")
                time.sleep(0.01)
            texts = [e["text"] for e in demo_events(500, seed=7)]
            load = LoadGenerator(engine, texts, plan.serve_clients)
            batches_before = _batch_stats(metrics_registry)
            busy = load.run_for(plan.serve_busy_s)
            batches_busy = _batch_stats(metrics_registry, batches_before)
            writer.halt.set()
            stop.set()
            trainer.join(300)
            idle = load.run_for(plan.serve_idle_s)
            batches_idle = _batch_stats(metrics_registry, _add(batches_before, batches_busy))
        finally:
            writer.halt.set()
            stop.set()
            engine.stop()
            trainer.join(120)
            if trainer.is_alive() and plan.isolate:
                trainer.terminate()
        timings = json.loads(Path(steps_path).read_text())
        steps = [tuple(s) for s in timings["steps"]]
        seen = {v: int(registry.meta(v).get("events_seen", 0)) for v in registry.versions()}
        fraction = settings.evaluation.holdout_fraction
        trained_ids = [i for i, _ in writer.arrivals if not is_held_out(i, writer.texts[i], fraction)]
    return {
        "busy": _summary(busy, batches_busy, steps, timings["publishes"]),
        "idle": _summary(idle, batches_idle, steps, timings["publishes"]),
        "freshness": _freshness(writer.arrivals, set(trained_ids), steps, seen, busy, plan),
        "versions": len(seen),
        "metric": _batch_stats(metrics_registry, name="dynft_freshness_seconds"),  # (count, sum) on the server
    }


def _batch_stats(
    registry: Any, minus: tuple[float, float] = (0.0, 0.0), name: str = "dynft_predict_batch_texts"
) -> tuple[float, float]:
    count = registry.get_sample_value(f"{name}_count") or 0.0
    total = registry.get_sample_value(f"{name}_sum") or 0.0
    return count - minus[0], total - minus[1]


def _add(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return a[0] + b[0], a[1] + b[1]


def _summary(load: Load, batches: tuple[float, float], steps: list[Any], publishes: list[Any]) -> dict[str, Any]:
    latencies = load.latencies()

    def share(spans: list[tuple[float, float]]) -> float:  # of the phase's time
        return sum(max(0.0, min(b, load.stopped) - max(a, load.started)) for a, b in spans) / load.seconds

    return {
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "requests_per_s": len(latencies) / load.seconds,
        "requests": len(latencies),
        "failures": len(load.failures),
        "texts_per_batch": batches[1] / batches[0] if batches[0] else float("nan"),
        "trainer_steps": share([(s[0], s[1]) for s in steps]),
        "trainer_publishing": share([(a, b) for a, b in publishes]),
    }


def settle_s(plan: Plan) -> float:
    return min(SETTLE_S, plan.serve_busy_s / 3)  # the smoke suite's busy phase is short


def _freshness(
    arrivals: list[tuple[str, float]],
    trained_ids: set[str],
    steps: list[Any],
    seen: dict[int, int],
    busy: Load,
    plan: Plan,
) -> dict[str, Any]:
    """Arrival -> trained on and arrival -> first served, for events that arrived while serving was timed."""
    first_served: dict[int, float] = {}
    for answer in busy.answers:
        done = answer.sent + answer.seconds
        first_served[answer.version] = min(done, first_served.get(answer.version, done))
    trained_at: list[float] = []  # time the k-th trained event's step ended
    for _, end, fresh, skipped in steps:
        if not skipped:
            trained_at += [end] * fresh
    horizon = busy.stopped - settle_s(plan)  # later arrivals may not be served yet
    to_trained, to_served, unserved, k = [], [], 0, 0
    for event_id, arrived in arrivals:
        if event_id not in trained_ids:
            continue
        k += 1
        if not busy.started <= arrived <= horizon:
            continue
        served = [t for v, t in first_served.items() if seen.get(v, 0) >= k]
        if k > len(trained_at) or not served:
            unserved += 1
            to_served.append(math.inf)  # it counts: a freshness that skips what was never served flatters
            continue
        to_trained.append(trained_at[k - 1] - arrived)
        to_served.append(min(served) - arrived)
    return {
        "served_p50_s": percentile(to_served, 50),
        "served_p95_s": percentile(to_served, 95),
        "trained_p50_s": percentile(to_trained, 50),
        "trained_p95_s": percentile(to_trained, 95),
        "events": len(to_served),
        "unserved": unserved,
        "median_version_gap_s": median([b - a for a, b in itertools.pairwise(sorted(first_served.values()))]),
    }


def run(plan: Plan) -> list[Result]:
    progress(
        f"  serving under training: trainer process + engine, {plan.serve_busy_s:g} s busy, "
        f"{plan.serve_idle_s:g} s idle, {plan.serve_clients} clients, {plan.serve_event_rate:g} events/s ..."
    )
    from benchmarks.common import in_fresh_process

    m = in_fresh_process(plan.isolate, measure, plan)
    busy, idle, fresh = m["busy"], m["idle"], m["freshness"]
    load = f"{plan.serve_clients} closed-loop clients, one text per request, {plan.model}"
    common = {
        "p50 ms busy/idle": [rounded(busy["p50_ms"]), rounded(idle["p50_ms"])],
        "texts per micro-batch busy/idle": [rounded(busy["texts_per_batch"]), rounded(idle["texts_per_batch"])],
        "trainer's time in the busy phase": f"steps {busy['trainer_steps']:.0%}, publishing (gate included) "
        f"{busy['trainer_publishing']:.0%}",
        "failed requests busy/idle": [busy["failures"], idle["failures"]],
        "requests busy/idle": [busy["requests"], idle["requests"]],
    }
    setup = (
        f"shipped publishing settings (fresh publishing, full gate checks every 20 s or 50 steps); events at "
        f"{plan.serve_event_rate:g}/s; {HOLDOUT} held-out events to start with; watcher poll 0.2 s; "
        f"{m['versions']} versions"
    )
    return [
        Result(
            "predict p99 latency under training",
            f"p99 of predict with the trainer training vs stopped ({load})",
            "ms",
            busy["p99_ms"],
            idle["p99_ms"],
            "trainer idle",
            higher_is_better=False,
            details=common,
        ),
        Result(
            "predict throughput under training",
            f"requests/s with the trainer training vs stopped ({load})",
            "requests/s",
            busy["requests_per_s"],
            idle["requests_per_s"],
            "trainer idle",
        ),
        Result(
            "freshness p50",
            "event arrival -> first answer by a version that trained on it, vs arrival -> trained on",
            "s",
            fresh["served_p50_s"],
            fresh["trained_p50_s"],
            "trained on (step done)",
            higher_is_better=False,
            goal="dynft <= 2 s",
            met=fresh["served_p50_s"] <= 2.0,
            details={
                "events timed": fresh["events"],
                f"events never served (counted as infinitely late), of those that arrived {settle_s(plan):g} s or more "
                "before the load stopped": fresh["unserved"],
                "median time between newly served versions s": rounded(fresh["median_version_gap_s"]),
                "dynft_freshness_seconds (server metric, whole run) mean s / events": [
                    rounded(m["metric"][1] / m["metric"][0]) if m["metric"][0] else None,
                    int(m["metric"][0]),
                ],
                "setup": setup,
            },
        ),
        Result(
            "freshness p95",
            "event arrival -> first answer by a version that trained on it, vs arrival -> trained on",
            "s",
            fresh["served_p95_s"],
            fresh["trained_p95_s"],
            "trained on (step done)",
            higher_is_better=False,
            goal="dynft <= 4 s",
            met=fresh["served_p95_s"] <= 4.0,
        ),
    ]
