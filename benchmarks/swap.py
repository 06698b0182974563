"""Hot swap: how long a swap blocks requests, beside peft's ways of changing adapter weights.

Two published versions of one adapter (same shapes, different weights) are swapped back and
forth. dynft's swap has two parts: ``InferenceEngine.load`` reads, hash-checks, validates and
stages a version off the request path; the flip (``_install``, on the inference thread between
two batches) swaps parameter references. peft's functions copy into the live weights in place,
so a server has to hold inference for all of it:

- ``set_peft_model_state_dict`` with the state dict already on the device, against dynft's flip
  (what blocks requests in each case);
- ``peft.utils.hotswap.hotswap_adapter`` from a version directory, against dynft's load + flip
  from the same directory. peft's hotswap supports LoRA weights only (it fails with a KeyError
  on the classification head's ``modules_to_save`` keys), so it reads a LoRA-only copy of the
  version and swaps less than dynft does.

Then N swaps through the registry (promote, watcher, flip) under a closed-loop predict load,
against the same load without swaps: failed requests and throughput.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Result, in_fresh_process, percentile, progress, quiet, rounded, sync
from benchmarks.loadgen import LoadGenerator
from benchmarks.plans import Plan
from benchmarks.streams import demo_events


def _timed(fn: Any, repeats: int, device: str) -> list[float]:
    for i in range(3):
        fn(i)
    out = []
    for i in range(repeats):
        sync(device)
        started = time.perf_counter()
        fn(i)
        sync(device)
        out.append(time.perf_counter() - started)
    return out


def _publish_two(settings: Any, registry: Any) -> list[Any]:
    """Versions 1 and 2: a briefly trained adapter that knows every demo label, and a perturbed copy."""
    import torch

    from dynft.events import Event
    from dynft.model import AdapterState
    from dynft.trainer import build_trainer

    trainer = build_trainer(settings.model, settings.adapter, settings.trainer)
    events = [Event(**e) for e in demo_events(64, seed=3)]
    for i in range(0, 64, 16):
        trainer.step(trainer.collator(events[i : i + 16], n_fresh=16))
    first = trainer.export()
    torch.manual_seed(1)
    second = AdapterState(
        {k: t + 0.01 * torch.randn_like(t) for k, t in first.tensors.items()},
        first.labels,
        first.peft_config,
        lexical=first.lexical,  # every version carries its word counts (trainer.lexical_blend)
    )
    for i in range(2 + CYCLE):  # 1 and 2, then distinct versions for the paced swaps
        registry.publish((first, second)[i % 2], {"step": i})
    return [first, second]


def _lora_only_dirs(registry: Any, root: Path) -> list[str]:
    """peft-format copies of versions 1 and 2 without the head, which peft's hotswap cannot swap."""
    from safetensors.torch import load_file, save_file

    out = []
    for version in (1, 2):
        src, dst = registry.path(version), root / f"lora-only-{version}"
        dst.mkdir()
        tensors = load_file(str(src / "adapter_model.safetensors"))
        save_file({k: t for k, t in tensors.items() if "lora_" in k}, str(dst / "adapter_model.safetensors"))
        config = json.loads((src / "adapter_config.json").read_text())
        config["modules_to_save"] = None
        (dst / "adapter_config.json").write_text(json.dumps(config))
        out.append(str(dst))
    return out


def _named(key: str) -> str:
    """A saved peft key with the adapter name put back (``...lora_A.weight`` -> ``...lora_A.default.weight``)."""
    stem, _, leaf = key.rpartition(".")
    return f"{stem}.default.{leaf}"


def _peft_model(settings: Any, labels: int, device: str) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from benchmarks.training import LORA

    base = AutoModelForSequenceClassification.from_pretrained(
        settings.model.path,
        num_labels=labels,
        dtype=torch.bfloat16 if device == "cuda" else torch.float32,
        local_files_only=True,
        ignore_mismatched_sizes=True,
    )
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", **LORA))  # type: ignore[arg-type]
    return model.to(device).eval()


SWAP_RATES = (1.0, 50.0)  # the two loads: one swap a second, and fifty
SWAP_GOALS = {1.0: 0.9, 50.0: 0.7}  # predict throughput kept, against no swaps
CYCLE = 8  # distinct versions promoted in turn: every swap is a fresh load, as with a real trainer


SWAP_PIECES = 3  # each rate's swaps come in pieces, each after a piece of the same load without swaps


def _promoter(conn: Any, root: str, versions: list[int], threads: int) -> None:
    """Stands in for the trainer process: for each ``(rate, seconds)`` it is sent, promotes
    ``versions`` in turn at ``rate`` per second for ``seconds`` and sends back
    (version, time.time()) per promotion; ``None`` ends it. With the co-located trainer's torch
    threads (the cores the server leaves): with one per core, a promotion's checks (a parallel
    ``isfinite``) kept every core spinning at 50 promotions a second, as no trainer would."""
    import torch

    from dynft.registry import AdapterRegistry

    torch.set_num_threads(threads)
    registry = AdapterRegistry(Path(root), keep_last=1000)
    conn.send("ready")
    while (order := conn.recv()) is not None:
        rate, seconds = order
        promoted: list[tuple[int, float]] = []
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            version = versions[len(promoted) % len(versions)]
            registry.promote(version, "benchmark")
            promoted.append((version, time.time()))
            time.sleep(max(0.0, started + len(promoted) / rate - time.perf_counter()))
        conn.send(promoted)


def _interleaved(
    engine: Any, registry: Any, load: Any, seconds: float, isolate: bool
) -> tuple[dict[float, dict[str, Any]], dict[float, dict[str, Any]]]:
    """Per rate: the load without swaps and with, in ``SWAP_PIECES`` alternating pieces of
    ``seconds / SWAP_PIECES`` each, so that a machine whose speed drifts (other tenants, clock
    changes) slows both sides alike. Promotions come from another process (a thread in the
    smoke suite): they cost the trainer's process, not the server's, as in the daemon."""
    import multiprocessing

    versions = [v for v in registry.versions() if v != engine.active.version][:CYCLE]
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    threads = max(1, (os.cpu_count() or 1) - engine.settings.server.threads)  # as dynft.loop gives the trainer
    args = (there, str(registry.root), versions, threads)
    promoter: Any = (
        ctx.Process(target=_promoter, args=args) if isolate else threading.Thread(target=_promoter, args=args)
    )
    promoter.start()
    here.recv()  # imports done: they are not part of any phase
    quiet: dict[float, dict[str, Any]] = {}
    paced: dict[float, dict[str, Any]] = {}
    try:
        for rate in SWAP_RATES:
            piece = seconds / SWAP_PIECES
            pieces = [(load.run_for(piece), _paced(engine, here, load, rate, piece)) for _ in range(SWAP_PIECES)]
            quiet[rate] = _without_swaps([q for q, _ in pieces])
            paced[rate] = _merged([p for _, p in pieces], rate)
    finally:
        here.send(None)
        promoter.join()
    return quiet, paced


def _without_swaps(loads: list[Any]) -> dict[str, Any]:
    return {
        "answers": sum(len(q.answers) for q in loads),
        "seconds": sum(q.seconds for q in loads),
        "failures": [f for q in loads for f in q.failures],
        "latency_p99": percentile([x for q in loads for x in q.latencies()], 99),
    }


def _merged(pieces: list[dict[str, Any]], rate: float) -> dict[str, Any]:
    return {
        "answers": sum(p["answers"] for p in pieces),
        "seconds": sum(p["seconds"] for p in pieces),
        "failures": [f for p in pieces for f in p["failures"]],
        "promotions": sum(p["promotions"] for p in pieces),
        "swaps": sum(p["swaps"] for p in pieces),
        "promote_to_serving": [x for p in pieces for x in p["promote_to_serving"]],
        "timeouts": sum(p["timeouts"] for p in pieces) if rate <= 1.0 else 0,
        "versions_seen": sorted({v for p in pieces for v in p["versions_seen"]}),
        "latency_p99": percentile([x for p in pieces for x in p["latencies"]], 99),
    }


def _paced(engine: Any, conn: Any, load: Any, rate: float, seconds: float) -> dict[str, Any]:
    """One piece of the closed-loop load while the promoter promotes at ``rate`` per second; a
    watcher thread notes when each version starts serving."""
    served: list[tuple[float, int]] = []
    stop = threading.Event()

    def watch() -> None:
        last = None
        while not stop.is_set():
            version = engine.active.version
            if version != last:
                served.append((time.time(), version))
                last = version
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    load.start()
    conn.send((rate, seconds))
    promoted: list[tuple[int, float]] = conn.recv()
    swapping = load.stop()
    stop.set()
    watcher.join()
    latencies = _promote_to_serving(promoted, served, 1.0 / rate)
    return {
        "answers": len(swapping.answers),
        "seconds": swapping.seconds,
        "failures": swapping.failures,
        "promotions": len(promoted),
        "swaps": len(served) - 1,
        "promote_to_serving": [x for x in latencies if x is not None],
        "timeouts": sum(x is None for x in latencies),
        "versions_seen": sorted({a.version for a in swapping.answers}),
        "latencies": swapping.latencies(),
    }


def _promote_to_serving(
    promoted: list[tuple[int, float]], served: list[tuple[float, int]], interval: float
) -> list[float | None]:
    """Per promotion, the seconds until its version served, or None if another promotion came first."""
    out: list[float | None] = []
    for version, at in promoted:
        first = next((t for t, v in served if v == version and at <= t), None)
        out.append(first - at if first is not None and first - at <= interval else None)
    return out


def measure(plan: Plan) -> dict[str, Any]:
    """Everything, in one process (the engine, peft's model, the load)."""
    quiet()
    import torch
    from peft import set_peft_model_state_dict
    from peft.utils.hotswap import hotswap_adapter, hotswap_adapter_from_state_dict
    from prometheus_client import CollectorRegistry

    from dynft.metrics import ServerMetrics
    from dynft.model import peft_config_from_dict
    from dynft.registry import AdapterRegistry
    from dynft.serving.engine import InferenceEngine
    from dynft.settings import load_settings

    device = plan.device
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(
            overrides={
                "state_dir": tmp,
                "model.path": plan.model_path,
                "model.device": device,
                "server.poll_interval_s": 0.01,
            }
        )
        torch.set_num_threads(settings.server.threads)
        registry = AdapterRegistry(settings.registry_dir, keep_last=1000)
        states = _publish_two(settings, registry)
        engine = InferenceEngine(settings, registry, ServerMetrics(CollectorRegistry()))
        engine._install(engine.load(1))  # later loads reuse this model
        staged = [engine.load(1), engine.load(2)]
        flip = _timed(lambda i: engine._install(staged[i % 2]), plan.swap_repeats, device)
        from_disk = _timed(lambda i: engine._install(engine.load(1 + i % 2)), plan.swap_repeats, device)

        model = _peft_model(settings, len(states[0].labels), device)
        on_device = [{k: t.to(device) for k, t in s.tensors.items()} for s in states]
        set_sd = _timed(lambda i: set_peft_model_state_dict(model, on_device[i % 2]), plan.swap_repeats, device)
        dirs = _lora_only_dirs(registry, Path(tmp))
        hotswap = _timed(lambda i: hotswap_adapter(model, dirs[i % 2], "default", device), plan.swap_repeats, device)
        config = peft_config_from_dict(states[0].peft_config)
        lora = [{_named(k): t for k, t in sd.items() if "lora_" in k} for sd in on_device]
        hotswap_sd = _timed(
            lambda i: hotswap_adapter_from_state_dict(model, lora[i % 2], "default", config),  # type: ignore[arg-type]
            plan.swap_repeats,
            device,
        )
        adapter_kb = states[0].nbytes / 1024

        registry.promote(1, "benchmark")
        engine.start()
        while not engine.ready:
            time.sleep(0.01)
        texts = [e["text"] for e in demo_events(500, seed=4)]
        load = LoadGenerator(engine, texts, plan.swap_clients)
        load.run_for(min(2.0, plan.swap_quiet_s))  # warm-up
        without, paced = _interleaved(engine, registry, load, plan.swap_phase_s, plan.isolate)
        engine.stop()
    return {
        "flip": flip,
        "from_disk": from_disk,
        "set_peft_model_state_dict": set_sd,
        "hotswap_adapter": hotswap,
        "hotswap_adapter_from_state_dict": hotswap_sd,
        "adapter_kb": adapter_kb,
        "quiet": without,
        "paced": paced,
    }


def _ms(values: list[float], q: float) -> float:
    return 1000 * percentile(values, q)


def run(plan: Plan) -> list[Result]:
    rates = " and ".join(f"{r:g}/s" for r in SWAP_RATES)
    progress(
        f"  hot swap: {plan.swap_repeats} timed swaps per method, "
        f"then {plan.swap_phase_s:g} s of swaps at {rates} under load ..."
    )
    m = in_fresh_process(plan.isolate, measure, plan)
    where = "device-resident" if plan.device == "cuda" else "in memory"
    return [
        Result(
            "hot swap, the part that blocks requests",
            f"p99 of dynft's flip vs set_peft_model_state_dict with the state dict {where}",
            "ms",
            _ms(m["flip"], 99),
            _ms(m["set_peft_model_state_dict"], 99),
            "peft set_peft_model_state_dict",
            higher_is_better=False,
            goal="ratio >= 10" + (" and dynft p99 <= 0.5 ms" if plan.device == "cuda" else ""),
            met=_ms(m["set_peft_model_state_dict"], 99) >= 10 * _ms(m["flip"], 99)
            and (plan.device != "cuda" or _ms(m["flip"], 99) <= 0.5),
            details={
                "p50 dynft flip ms": rounded(_ms(m["flip"], 50)),
                "p50 set_peft_model_state_dict ms": rounded(_ms(m["set_peft_model_state_dict"], 50)),
                "p50/p99 hotswap_adapter_from_state_dict ms (LoRA only)": [
                    rounded(_ms(m["hotswap_adapter_from_state_dict"], q)) for q in (50, 99)
                ],
                "adapter KB (LoRA + head)": rounded(m["adapter_kb"]),
                "swaps timed": len(m["flip"]),
            },
        ),
        Result(
            "hot swap from the version directory",
            "p99 of dynft's load (read, hash, check, stage) + flip vs peft hotswap_adapter(dir)",
            "ms",
            _ms(m["from_disk"], 99),
            _ms(m["hotswap_adapter"], 99),
            "peft hotswap_adapter (LoRA weights only)",
            higher_is_better=False,
            goal="ratio >= 2",
            met=_ms(m["hotswap_adapter"], 99) >= 2 * _ms(m["from_disk"], 99),
            details={
                "p50 dynft load + flip ms": rounded(_ms(m["from_disk"], 50)),
                "p50 hotswap_adapter ms": rounded(_ms(m["hotswap_adapter"], 50)),
                "note": "peft's hotswap cannot swap the head (modules_to_save): it reads a LoRA-only copy and does "
                "less work; dynft's load runs off the request path, peft's swap in place blocks inference",
            },
        ),
        *(_throughput_row(plan, m["quiet"][rate], m["paced"][rate], rate) for rate in SWAP_RATES),
    ]


def _throughput_row(plan: Plan, quiet: dict[str, Any], paced: dict[str, Any], rate: float) -> Result:
    """Predict throughput while versions are promoted at ``rate`` per second, against no swaps."""
    failed = len(paced["failures"])
    floor = SWAP_GOALS[rate]
    ratio = paced["answers"] / paced["seconds"] / (quiet["answers"] / quiet["seconds"])
    return Result(
        f"predict throughput at {rate:g} swap(s)/s",
        f"requests/s of {plan.swap_clients} closed-loop clients while promoting {rate:g} versions/s vs no swaps",
        "requests/s",
        paced["answers"] / paced["seconds"],
        quiet["answers"] / quiet["seconds"],
        f"same load without swaps, in {SWAP_PIECES} pieces alternating with the swaps",
        goal=f"ratio >= {floor} and 0 failed requests",
        met=failed == 0 and not paced["timeouts"] and ratio >= floor,
        details={
            "failed requests": failed,
            "failed requests without swaps": len(quiet["failures"]),
            "failures (first 3)": paced["failures"][:3],
            "requests answered while swapping": paced["answers"],
            "promotions": paced["promotions"],
            "versions that served (changes seen)": paced["swaps"],
            "promotions not served before the next one": paced["timeouts"],
            "promote -> serving p50/p99 ms": [rounded(_ms(paced["promote_to_serving"], q)) for q in (50, 99)]
            if paced["promote_to_serving"]
            else "not followed (promotions do not wait at this rate)",
            "predict p99 ms without/with swaps": [
                rounded(1000 * quiet["latency_p99"]),
                rounded(1000 * paced["latency_p99"]),
            ],
            "versions answering": paced["versions_seen"],
            "server.poll_interval_s": 0.01,
        },
    )
