"""Fine-tuning paradigms side by side: LoRA at ranks 2, 8 and 32, full fine-tuning, and the
classification head alone, on the packaged all-MiniLM-L6-v2.

Every configuration is trained by dynft's ``OnlineTrainer`` (same step: AdamW, clipping,
warm-up over the first 10% of steps, batches of 16) on the same ``paradigm_train`` events
of a dataset, one pass in file order, then scored on ``paradigm_test`` test rows. Only what
is trainable differs:

- LoRA r: peft LoRA on peft's default target modules, ``alpha = 2 r`` (dynft's default
  ratio, 16 / 8), adapter learning rate 2e-3, head 6e-3 (dynft's defaults);
- full fine-tuning: every weight of the encoder at 1e-4 (LoRA weights frozen at zero), head 6e-3;
- head only: the encoder frozen (LoRA weights frozen at zero), head 6e-3.

Every configuration reads the mean-pooled features and imprints new labels' head rows, as
dynft does by default for this model (``model.pooling``, ``trainer.imprint_new_labels``).

The size on disk is what a version would have to carry: the LoRA tensors and the head, the
head alone, or every weight for full fine-tuning (safetensors, float32).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.quality.streams import DATA, read
from benchmarks.quality.suites import Suite, dynft_overrides

CONFIGS = ("LoRA r=2", "LoRA r=8", "LoRA r=32", "full fine-tuning", "head only")
FULL_LR = 1e-4
BATCH = 16


def rank_of(config: str) -> int:
    return int(config.split("=")[1]) if config.startswith("LoRA") else 8


def build(config: str, suite: Suite, tmp: str, steps: int) -> Any:
    import torch

    from dynft.settings import load_settings
    from dynft.trainer import build_trainer

    r = rank_of(config)
    overrides = dynft_overrides(suite, "dynft") | {
        "state_dir": tmp,
        "adapter.r": r,
        "adapter.alpha": 2.0 * r,
        "trainer.warmup_steps": max(1, steps // 10),
    }
    settings = load_settings(overrides=overrides)
    torch.set_num_threads(suite.threads)
    trainer = build_trainer(settings.model, settings.adapter, settings.trainer)
    if not config.startswith("LoRA"):
        for name, param in trainer.model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(False)  # B starts at zero: frozen, the adapter is the identity
    if config == "full fine-tuning":
        encoder = [
            p
            for name, p in trainer.model.named_parameters()
            if "lora_" not in name and "modules_to_save" not in name and "original_module" not in name
        ]
        for param in encoder:
            param.requires_grad_(True)
        trainer.optimizer.add_param_group({"params": encoder, "lr": FULL_LR, "base_lr": FULL_LR})
    return trainer


def saved_bytes(trainer: Any, config: str, tmp: str) -> int:
    from safetensors.torch import save_file

    state = trainer.export()
    if config == "head only":
        tensors = {k: t for k, t in state.tensors.items() if k in trainer.slots.head_keys}
    elif config == "full fine-tuning":
        tensors = {n: p.detach().cpu().contiguous() for n, p in trainer.model.named_parameters() if p.requires_grad}
    else:
        tensors = state.tensors
    path = Path(tmp) / "weights.safetensors"
    save_file(tensors, str(path))
    return path.stat().st_size


def run_paradigm(dataset: str, config: str, suite: Suite, data: Path = DATA) -> dict[str, Any]:
    from dynft.events import Event

    train = read(data / dataset / "train.jsonl")[: suite.paradigm_train]
    test = read(data / dataset / "test.jsonl")[: suite.paradigm_test]
    events = [Event(id=f"{dataset}-{i}", text=r["text"], label=r["label"]) for i, r in enumerate(train)]
    probes = [Event(id=f"{dataset}-t{i}", text=r["text"], label=r["label"]) for i, r in enumerate(test)]
    with tempfile.TemporaryDirectory(prefix="dynft-quality-") as tmp:
        trainer = build(config, suite, tmp, steps=-(-len(events) // BATCH))
        started, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(events), BATCH):
            trainer.step(trainer.collator(events[i : i + BATCH], n_fresh=0))
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)  # head grown by now
        predicted = trainer.predict(probes, trainer.exported_labels())
        size = saved_bytes(trainer, config, tmp)
    return {
        "dataset": dataset,
        "config": config,
        "test_accuracy": sum(p == e.label for p, e in zip(predicted, probes, strict=True)) / len(probes),
        "trainable_params": trainable,
        "saved_bytes": size,
        "train_seconds": seconds,
        "train_cpu_seconds": cpu,  # unlike the wall time, not inflated by waiting for a busy core
        "train_events": len(events),
        "test_events": len(probes),
        "skipped_steps": trainer.skipped,
    }
