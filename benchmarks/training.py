"""Trainer throughput: the daemon's sustained samples/s beside a bare peft loop, and the step's MFU.

dynft runs as the daemon does: a ``TrainingLoop`` reads a JSON Lines file through its intake
thread; its batching thread decodes, holds out, samples replay and tokenizes; its main thread
trains test-then-train (prequential metrics, drift detectors), publishes versions through the
promotion gate, writes checkpoints and the ledger. Three calls are wrapped only to timestamp
them (``trainer.step``, ``publisher.maybe_publish``, ``checkpoints.save``).

The baseline is peft's own recipe (``get_peft_model``, forward with labels, backward, AdamW;
bf16 autocast, fused AdamW, pinned host batches and non-blocking copies on CUDA) on the same
model, LoRA configuration, batch shape and device, over pre-tokenized batches of the same
texts. Every text fills the sequence length, so both train on full (B, T) batches.

The stream starts with a held-out window's worth of held-out events, and the registry with a
serving version, so that every publish is gated on a full window as in steady state. dynft's
measuring window spans whole publish periods (see ``Probe``), so publishing (gate, registry
write) and checkpoints count with their steady-state share.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import Result, checkpoint, in_fresh_process, median, progress, quiet, rounded, sync
from benchmarks.plans import Plan, TrainCase
from benchmarks.streams import held_out_ids, long_events, read_jsonl, with_ids, write_jsonl

LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05}  # dynft's adapter defaults


def matmul_peak(device: str) -> tuple[float, str]:
    """FLOP/s of the best of several large square matmuls: bf16 on CUDA, fp32 on CPU."""
    import torch

    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1536, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(8):
        sync(device)
        started = time.perf_counter()
        a @ b
        sync(device)
        if i >= 2:
            best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best, "bf16" if device == "cuda" else "fp32"


def frozen_params(model: Any) -> tuple[int, int]:
    """Frozen parameters of a peft model: all of them, and those outside the embeddings."""
    frozen = [(name, p.numel()) for name, p in model.named_parameters() if not p.requires_grad]
    return sum(n for _, n in frozen), sum(n for name, n in frozen if "embeddings" not in name)


def bare_peft(case: TrainCase, device: str, threads: int, plan: dict[str, Any], events_path: str) -> dict[str, Any]:
    """peft's bare LoRA loop; runs in its own process."""
    quiet()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(threads)
    peak, peak_dtype = matmul_peak(device)
    cuda = device == "cuda"
    events = [e for e in read_jsonl(Path(events_path)) if e["id"].startswith("t")][: 32 * case.batch]
    labels = sorted({e["label"] for e in events})
    tokenizer = AutoTokenizer.from_pretrained(case.path, local_files_only=True)
    batches = []
    for i in range(0, len(events) - case.batch + 1, case.batch):
        chunk = events[i : i + case.batch]
        enc = tokenizer(
            [e["text"] for e in chunk], padding="max_length", truncation=True, max_length=case.seq, return_tensors="pt"
        )
        ids = torch.tensor([labels.index(e["label"]) for e in chunk])
        tensors = (enc["input_ids"], enc["attention_mask"], ids)
        batches.append(tuple(t.pin_memory() for t in tensors) if cuda else tensors)
    base = AutoModelForSequenceClassification.from_pretrained(
        case.path,
        num_labels=len(labels),
        dtype=torch.bfloat16 if cuda else torch.float32,
        local_files_only=True,
        ignore_mismatched_sizes=True,
    )
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", **LORA))  # type: ignore[arg-type]
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()  # fp32 master weights, as dynft keeps them
    model.to(device)
    model.train()
    n_frozen, n_nonemb = frozen_params(model)
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.01, fused=cuda)
    forward = torch.compile(model) if plan["compile"] else model

    # peft's recipe: bf16 autocast on CUDA, fp32 on CPU; ``plan["autocast"]``: bf16 on CPU too
    amp = cuda or plan.get("autocast", False)

    def step(batch: tuple[Any, ...]) -> None:
        ids, mask, y = (t.to(device, non_blocking=cuda) for t in batch)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            loss = forward(input_ids=ids, attention_mask=mask, labels=y).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(plan["warmup"]):
        step(batches[i % len(batches)])
    sync(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    ends = [started]
    while True:
        step(batches[len(ends) % len(batches)])
        ends.append(time.perf_counter())
        elapsed = ends[-1] - started
        if (elapsed >= plan["window_s"] and len(ends) > 3) or elapsed >= plan["max_s"]:
            break
    sync(device)
    elapsed = time.perf_counter() - started
    steps = len(ends) - 1
    return {
        "samples_per_s": steps * case.batch / elapsed,
        "cpu_s_per_sample": (time.process_time() - cpu_started) / (steps * case.batch),
        "step_rate": case.batch / median([b - a for a, b in itertools.pairwise(ends)]),
        "steps": steps,
        "window_s": elapsed,
        "peak_flops": peak,
        "peak_dtype": peak_dtype,
        "frozen_params": n_frozen,
        "frozen_params_no_embeddings": n_nonemb,
    }


class Probe:
    """Timestamps a running loop's steps, publishes and checkpoints, and ends it when its window is done.

    The window runs from the start of the loop's second publish with a full gate check to the
    moment a later full check falls due at least ``window_s`` later (the end of the step that
    makes it due): whole full-check periods, each holding one full check and the quick checks of
    the fresh publishes between (``dynft.scoring``), whatever they cost, and both ends fall
    between two steps. The first full check is left out: it also scores the serving version on the
    whole held-out window, which later checks find cached. When the window closes, the loop is
    told to stop and publishes no more.
    """

    def __init__(self, loop: Any, device: str, window_s: float, max_s: float) -> None:
        self.loop, self.device, self.window_s = loop, device, window_s
        self.every_steps = loop.settings.registry.publish_every_steps
        self.interval_s = loop.settings.registry.publish_interval_s
        self.deadline = time.perf_counter() + max_s
        self.steps: list[tuple[float, float, int, int]] = []  # (start, end, rows, tokens per row)
        self.publishes: list[tuple[float, float]] = []
        self.full: list[tuple[float, int]] = []  # (start, steps before it) of publishes with a full gate check
        self.checkpoints: list[tuple[float, float]] = []
        self.closed: tuple[float, float] | None = None
        self.cpu_at: dict[float, float] = {}  # process CPU seconds (all threads) at publish starts and step ends
        loop.trainer.step = self._timed(loop.trainer.step, self._on_step)
        loop.publisher.maybe_publish = self._timed(loop.publisher.maybe_publish, self._on_publish)
        loop.checkpoints.save = self._timed(loop.checkpoints.save, self._on_checkpoint)

    def _timed(self, fn: Callable[..., Any], record: Callable[[float, Any, tuple[Any, ...]], None]) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            self.cpu_at[started] = time.process_time()
            out = fn(*args, **kwargs)
            record(started, out, args)
            return out

        return wrapper

    def _on_step(self, started: float, _: Any, args: tuple[Any, ...]) -> None:
        rows, seq = args[0].input_ids.shape
        now = time.perf_counter()
        self.cpu_at[now] = time.process_time()
        self.steps.append((started, now, int(rows), int(seq)))
        if self.closed is None and len(self.full) >= 2:
            first, (last, steps_then) = self.full[1][0], self.full[-1]
            due = len(self.steps) - steps_then >= self.every_steps or now - last >= self.interval_s
            if due and now - first >= self.window_s:
                self.closed = (first, now)
        if self.closed is not None or now > self.deadline:
            self.loop.should_exit.set()
            self.loop.publisher.maybe_publish = lambda *args, **kwargs: None  # the run is over

    def _on_publish(self, started: float, version: Any, _: tuple[Any, ...]) -> None:
        if version is not None:
            sync(self.device)
            self.publishes.append((started, time.perf_counter()))
            gate = self.loop.publisher.registry.meta(version).get("gate", {})
            if gate.get("scope") == "window" and gate.get("holdout_events"):  # not the seed's first version
                self.full.append((started, len(self.steps)))

    def _on_checkpoint(self, started: float, _: Any, __: tuple[Any, ...]) -> None:
        self.checkpoints.append((started, time.perf_counter()))

    def summary(self) -> dict[str, Any]:
        window, steady = self.closed, True
        if window is None:  # ran out of time: the longest span this run has, flagged
            steady = False
            first = self.publishes[0][0] if self.publishes else self.steps[min(3, len(self.steps) - 1)][1]
            window = (first, self.steps[-1][1])
        start, end = window
        inside = [s for s in self.steps if start < s[1] <= end]
        ends = [s[1] for s in inside]

        def busy(spans: list[tuple[float, float]]) -> float:
            return sum(max(0.0, min(b, end) - max(a, start)) for a, b in spans)

        elapsed = end - start
        rows = sum(s[2] for s in inside)
        return {
            "samples_per_s": rows / elapsed,
            "cpu_s_per_sample": (self.cpu_at[end] - self.cpu_at[start]) / rows,
            "step_rate": inside[0][2] / median([b - a for a, b in itertools.pairwise(ends)]),
            "steps": len(inside),
            "window_s": elapsed,
            "steady": steady,
            "publishes": sum(1 for a, _ in self.publishes if start <= a < end),
            "share_publish": busy(self.publishes) / elapsed,
            "share_checkpoint": busy(self.checkpoints) / elapsed,
            "share_step": busy([(a, b) for a, b, _, _ in self.steps]) / elapsed,
            "shapes": sorted({(s[2], s[3]) for s in inside}),
        }


def dynft_loop(case: TrainCase, device: str, threads: int, plan: dict[str, Any], events_path: str) -> dict[str, Any]:
    """The daemon's training service on the file; runs in its own process."""
    quiet()
    from dynft.loop import TrainingLoop
    from dynft.settings import load_settings

    with tempfile.TemporaryDirectory() as state_dir:
        settings = load_settings(
            overrides={
                "state_dir": state_dir,
                "source.uri": f"file:{events_path}",
                "source.exit_at_end": True,
                "model.path": case.path,
                "model.max_length": case.seq,
                "model.device": device,
                "trainer.batch_size": case.batch,
                "trainer.threads": threads,
                "registry.publish_interval_s": plan["publish_interval_s"],
                "evaluation.holdout_window": plan["holdout"],
                "trainer.compile": plan["compile"],
            }
        )
        _seed_version(settings, events_path)
        loop = TrainingLoop(settings)
        loop.startup()  # resumes from the seed version
        probe = Probe(loop, device, plan["window_s"], plan["max_s"])
        try:
            loop.main_loop()
        finally:
            loop.shutdown()
        compute = loop.trainer.compute_dtype
        return {**probe.summary(), "labels": len(loop.trainer.label_map), "autocast": str(compute or "off")}


def _seed_version(settings: Any, events_path: str) -> None:
    """A serving version to start from, as a daemon in steady state has: the first publish is then gated.

    That first gate also scores the serving version on the whole window (nothing is cached yet);
    from the second on, only held-out events new since the last gate are, as in steady state.
    """
    from dynft.events import Event
    from dynft.model import model_fingerprint
    from dynft.registry import AdapterRegistry
    from dynft.trainer import build_trainer

    trainer = build_trainer(settings.model, settings.adapter, settings.trainer)
    rows = [e for e in read_jsonl(Path(events_path)) if e["id"].startswith("t")][: settings.trainer.batch_size]
    trainer.step(trainer.collator([Event(**e) for e in rows], n_fresh=len(rows)))
    registry = AdapterRegistry(settings.registry_dir)
    fingerprint = model_fingerprint(Path(settings.model.path), trainer.pooling)
    meta = {"step": 0, "base_model": fingerprint, "note": "benchmark seed"}
    version = registry.publish(trainer.export(), meta).version
    registry.promote(version, reason="benchmark seed")


def _events_file(directory: Path, case: TrainCase, plan: Plan) -> Path:
    """A held-out window of held-out events, then enough long training events for the longest run."""
    per_s = 150 if plan.device == "cuda" else 10  # generous steps per second
    n = int(plan.train_max_s * per_s * case.batch)
    held = long_events(plan.train_holdout, case.seq, seed=1)
    held = with_ids(held, held_out_ids(held, 0.1))
    return write_jsonl(directory / "events.jsonl", held + long_events(n, case.seq, seed=2))


def _case_results(case: TrainCase, plan: Plan, bare: dict[str, Any], ours: dict[str, Any]) -> list[Result]:
    shape = f"{case.model}, batch {case.batch} x {case.seq} tokens, {plan.threads} thread(s)"
    n_all, n = bare["frozen_params"], bare["frozen_params_no_embeddings"]

    def mfu(figures: dict[str, Any], params: int) -> float:  # in % of the measured peak
        return float(100 * figures["samples_per_s"] * case.seq * 4 * params / bare["peak_flops"])

    ratio = ours["samples_per_s"] / bare["samples_per_s"]
    return [
        Result(
            f"trainer throughput ({shape})",
            "sustained training rows/s: source -> buffer -> trainer, prequential, gate, publish, checkpoints",
            "samples/s",
            ours["samples_per_s"],
            bare["samples_per_s"],
            "bare peft loop",
            goal="ratio >= 0.95",
            met=ratio >= 0.95,
            details={
                "dynft window": f"{ours['window_s']:.1f} s, {ours['steps']} steps, {ours['publishes']} publishes"
                + ("" if ours["steady"] else " (not whole publish periods: the run hit its time limit first)"),
                "dynft time shares": f"steps {ours['share_step']:.0%}, publish (gate included) "
                f"{ours['share_publish']:.0%}, checkpoints {ours['share_checkpoint']:.0%}",
                "gate": f"full checks on the {plan.train_holdout} held-out events of the window every "
                f"{plan.train_publish_interval_s:g} s or 50 steps; between them, a quick check (the newest 32) at each "
                "fresh publish, which keeps to registry.publish_budget (10%) of the time while batches wait",
                "batch shapes seen by dynft": ours["shapes"],
                "bare windows": f"{bare['window_s']:.1f} s, {bare['steps']} steps in {len(bare['runs'])} run(s) "
                f"(before and, on a CPU, after dynft's: {' and '.join(map(str, bare['runs']))} samples/s)",
                "labels": ours["labels"],
                "dynft computes in": f"{ours['autocast']} (model.autocast = auto); the bare loop as peft's recipe "
                f"does: {'bf16 autocast' if plan.device == 'cuda' else 'fp32'}",
            },
        ),
        Result(
            f"trainer CPU time per trained sample ({shape})",
            "CPU-seconds of the whole process (every thread: intake, batching, training, gate) per trained row",
            "ms",
            1000 * ours["cpu_s_per_sample"],
            1000 * bare["cpu_s_per_sample"],
            "bare peft loop",
            higher_is_better=False,
            goal="dynft <= 1.1 x bare (ratio >= 0.91)",
            met=ours["cpu_s_per_sample"] <= 1.1 * bare["cpu_s_per_sample"],
        ),
        Result(
            f"trainer step rate between publishes ({shape})",
            "rows / median time between consecutive steps (publishes and checkpoints excluded)",
            "samples/s",
            ours["step_rate"],
            bare["step_rate"],
            "bare peft loop",
        ),
        Result(
            f"LoRA step MFU ({shape})",
            f"4 * N * tokens FLOPs per step (N: frozen base params outside the embeddings) over a "
            f"{bare['peak_dtype']} matmul peak measured in the same run",
            "% of peak",
            mfu(ours, n),
            mfu(bare, n),
            "bare peft loop",
            details={
                "N": n,
                "frozen params with the embeddings": n_all,
                "tokens per step": case.batch * case.seq,
                f"peak {bare['peak_dtype']} matmul": f"{bare['peak_flops'] / 1e9:.1f} GFLOP/s",
                "with N counting the embeddings (lookups, no FLOPs) dynft/bare": [
                    rounded(mfu(ours, n_all)),
                    rounded(mfu(bare, n_all)),
                ],
            },
        ),
    ]


def _mean_of(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The bare loop's figures, averaged over its runs before and after dynft's (the machine may drift)."""
    out = dict(before)
    for key in ("samples_per_s", "step_rate", "cpu_s_per_sample"):
        out[key] = (before[key] + after[key]) / 2
    out["steps"] = before["steps"] + after["steps"]
    out["window_s"] = before["window_s"] + after["window_s"]
    out["runs"] = [round(before["samples_per_s"], 2), round(after["samples_per_s"], 2)]
    out["peak_flops"] = max(before["peak_flops"], after["peak_flops"])
    return out


def run(plan: Plan) -> list[Result]:
    results = []
    knobs = {
        "warmup": plan.train_warmup_steps,
        "window_s": plan.train_window_s,
        "max_s": plan.train_max_s,
        "publish_interval_s": plan.train_publish_interval_s,
        "holdout": plan.train_holdout,
        "compile": False,
    }
    bare_knobs = {**knobs, "window_s": plan.train_bare_s}  # twice: before and after dynft, averaged
    for case in plan.train_cases:
        with tempfile.TemporaryDirectory() as tmp:
            events = str(_events_file(Path(tmp), case, plan))
            progress(f"  training {case.model} {case.batch}x{case.seq}: bare peft loop ...")
            before = in_fresh_process(plan.isolate, bare_peft, case, plan.device, plan.threads, bare_knobs, events)
            progress(f"    bare peft: {before['samples_per_s']:.1f} samples/s; dynft loop ...")
            ours = in_fresh_process(plan.isolate, dynft_loop, case, plan.device, plan.threads, knobs, events)
            if plan.device == "cuda":  # a GPU's speed does not drift with other processes' load: once is enough
                bare = {**before, "runs": [round(before["samples_per_s"], 2)]}
                progress(f"    dynft: {ours['samples_per_s']:.1f} samples/s")
            else:
                progress(f"    dynft: {ours['samples_per_s']:.1f} samples/s; bare peft loop again ...")
                after = in_fresh_process(plan.isolate, bare_peft, case, plan.device, plan.threads, bare_knobs, events)
                progress(f"    bare peft: {after['samples_per_s']:.1f} samples/s")
                bare = _mean_of(before, after)
            case_results = _case_results(case, plan, bare, ours)
            if plan.device == "cpu" and ours["autocast"] != "off":  # the same precision, for a like-with-like view
                progress("    bare peft loop under dynft's bf16 autocast ...")
                amp = in_fresh_process(
                    plan.isolate, bare_peft, case, plan.device, plan.threads, {**bare_knobs, "autocast": True}, events
                )
                case_results[0].details["bare peft loop under the same bf16 autocast"] = rounded(amp["samples_per_s"])
                case_results[0].details["ratio vs that loop"] = rounded(ours["samples_per_s"] / amp["samples_per_s"])
            if plan.compile:
                progress("    bare peft loop under torch.compile ...")
                compiled = in_fresh_process(
                    plan.isolate, bare_peft, case, plan.device, plan.threads, {**bare_knobs, "compile": True}, events
                )
                case_results[0].details["bare peft + torch.compile"] = rounded(compiled["samples_per_s"])
                case_results[0].details["ratio vs compiled"] = rounded(
                    ours["samples_per_s"] / compiled["samples_per_s"]
                )
                progress("    dynft with trainer.compile ...")
                ours_compiled = in_fresh_process(
                    plan.isolate, dynft_loop, case, plan.device, plan.threads, {**knobs, "compile": True}, events
                )
                case_results[0].details["dynft + trainer.compile"] = rounded(ours_compiled["samples_per_s"])
                case_results[0].details["compiled ratio (dynft + compile / bare + compile)"] = rounded(
                    ours_compiled["samples_per_s"] / compiled["samples_per_s"]
                )
            results += case_results
            checkpoint(results)  # a case takes minutes on a GPU: a cut-off run keeps the finished ones
    return results
