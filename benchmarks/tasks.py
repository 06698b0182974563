"""Serving many tasks on one base model: throughput over 8 tasks against the same load on one.

Eight tasks (``default`` and seven others), each with its own LoRA adapter and head (random
non-zero weights, so every adapter product is really computed; 2 to 9 labels), are published
to a real registry and served by one ``InferenceEngine``. Closed-loop clients send one text per
request; in the *eight tasks* phases each client cycles through the tasks, so every micro-batch
mixes them; in the *one task* phases every request goes to ``default``. Same engine, same
clients, phases alternating. A third load, eight tasks with one forward pass per task group
(the engine before ``dynft.serving.mixed``), is timed beside them for reference.
Goal: eight-task throughput >= 0.8 x one-task throughput on CPU.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Result, in_fresh_process, median, percentile, progress, quiet, rounded
from benchmarks.loadgen import LoadGenerator
from benchmarks.plans import Plan
from benchmarks.streams import demo_events

TASKS = ["default", *(f"task{k}" for k in range(1, 8))]


def publish_tasks(settings: Any) -> None:
    """One promoted version per task: the trainer's adapter layout with random weights of its own."""
    import torch

    from dynft.fingerprint import BaseModelId
    from dynft.model import AdapterState
    from dynft.registry import AdapterRegistry
    from dynft.tasks import task_registry_dir
    from dynft.trainer import build_trainer

    trainer = build_trainer(settings.model, settings.adapter, settings.trainer)
    base = BaseModelId.of(trainer.base_model_path, trainer.pooling).fingerprint
    generator = torch.Generator().manual_seed(0)
    for k, task in enumerate(TASKS):
        labels = [f"{task}-{j}" for j in range(2 + k)]
        tensors = {}
        for key, param in trainer.slots.capture().items():
            shape = (len(labels), *param.shape[1:]) if key in trainer.slots.head_keys else tuple(param.shape)
            tensors[key] = torch.randn(shape, generator=generator) * 0.05
        registry = AdapterRegistry(task_registry_dir(settings.registry_dir, task))
        version = registry.publish(AdapterState(tensors, labels, dict(trainer.slots.peft_config)), {"base_model": base})
        registry.promote(version.version, "benchmark")


def measure(plan: Plan) -> dict[str, Any]:
    """Every phase's requests/s and latencies; runs in its own process."""
    quiet()
    import torch
    from prometheus_client import CollectorRegistry

    from dynft.metrics import ServerMetrics
    from dynft.registry import AdapterRegistry
    from dynft.serving.engine import InferenceEngine
    from dynft.settings import load_settings

    with tempfile.TemporaryDirectory() as tmp:
        overrides = {"state_dir": str(Path(tmp) / "state"), "model.path": plan.model_path, "model.device": plan.device}
        settings = load_settings(overrides=overrides)
        publish_tasks(settings)
        torch.set_num_threads(settings.server.threads)
        engine = InferenceEngine(settings, AdapterRegistry(settings.registry_dir), ServerMetrics(CollectorRegistry()))
        engine.start()
        try:
            deadline = time.monotonic() + 300
            while not all(t in engine.lanes and engine.lanes[t].active for t in TASKS):
                if time.monotonic() > deadline:
                    raise RuntimeError("the eight tasks' versions were not all served within 300 s")
                time.sleep(0.05)
            texts = [e["text"] for e in demo_events(500, seed=7)]
            loads = {
                "one task": LoadGenerator(engine, texts, plan.tasks_clients, tasks=TASKS[:1]),
                "eight tasks": LoadGenerator(engine, texts, plan.tasks_clients, tasks=TASKS),
            }
            loads["one task"].run_for(min(2.0, plan.tasks_phase_s))  # warm-up, not timed
            phases: dict[str, list[dict[str, float]]] = {name: [] for name in [*loads, "eight tasks, pass per task"]}
            mixed = engine._answer_mixed
            for _ in range(plan.tasks_rounds):
                for name, load in loads.items():
                    phases[name].append(_phase(load.run_for(plan.tasks_phase_s)))
                engine._answer_mixed = lambda groups: False  # type: ignore[method-assign]  # the per-group path
                phases["eight tasks, pass per task"].append(_phase(loads["eight tasks"].run_for(plan.tasks_phase_s)))
                engine._answer_mixed = mixed  # type: ignore[method-assign]
        finally:
            engine.stop()
    return {name: _merged(runs) for name, runs in phases.items()}


def _phase(load: Any) -> dict[str, float]:
    latencies = load.latencies()
    return {
        "requests_per_s": len(latencies) / load.seconds,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "failures": len(load.failures),
    }


def _merged(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: median([r[key] for r in runs]) if key != "failures" else sum(r[key] for r in runs) for key in runs[0]}


def run(plan: Plan) -> list[Result]:
    progress(
        f"  many tasks: 8 tasks vs 1, {plan.tasks_clients} clients, {plan.tasks_rounds} x "
        f"{plan.tasks_phase_s:g} s per load ..."
    )
    m = in_fresh_process(plan.isolate, measure, plan)
    one, eight, apart = m["one task"], m["eight tasks"], m["eight tasks, pass per task"]
    ratio = eight["requests_per_s"] / one["requests_per_s"] if one["requests_per_s"] else float("nan")
    return [
        Result(
            "throughput over 8 tasks",
            f"requests/s spread evenly over 8 tasks (own adapter and head each) vs all on one task "
            f"({plan.tasks_clients} closed-loop clients, one text per request, {plan.model})",
            "requests/s",
            eight["requests_per_s"],
            one["requests_per_s"],
            "the same load on one task",
            goal=">= 0.8",
            met=ratio >= 0.8 if plan.device == "cpu" else None,
            details={
                "p50 ms eight/one": [rounded(eight["p50_ms"]), rounded(one["p50_ms"])],
                "p99 ms eight/one": [rounded(eight["p99_ms"]), rounded(one["p99_ms"])],
                "failed requests eight/one": [eight["failures"], one["failures"]],
                "eight tasks, one forward pass per task group: requests/s": rounded(apart["requests_per_s"]),
                "eight tasks, one forward pass per task group: ratio to one task": rounded(
                    apart["requests_per_s"] / one["requests_per_s"] if one["requests_per_s"] else float("nan")
                ),
                "phases": f"{plan.tasks_rounds} x {plan.tasks_phase_s:g} s each, alternating; medians",
            },
        )
    ]
