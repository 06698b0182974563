"""What makes dynft learn fast on short streams? ``python -m benchmarks.quality.whatif``.

A diagnostic, not part of the suites: dynft's trainer on the first 480 events of SST-2, AG News
and a BANKING77 class-incremental slice (24 intents, 8 events each, 8 intents at a time), with
8 fresh + 8 replayed events per step as the loop does, prequential accuracy, for

- ``[CLS] pooler``: the head reads BERT's [CLS] pooler (dense + tanh), which all-MiniLM-L6-v2
  was never trained to use (dynft before ``model.pooling``);
- ``mean pooling``: the attention-masked mean of the last hidden states (``model.pooling``);
- ``mean pooling + imprinting``: and new labels' head rows start at their first examples'
  centred mean feature (``trainer.imprint_new_labels``): dynft as shipped for this model;
- each at half the shipped learning rates too (dynft's defaults before this comparison).
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any

import torch

from benchmarks.quality.streams import DATA, read

VARIANTS: dict[str, dict[str, Any]] = {
    "[CLS] pooler": {"model.pooling": "cls", "trainer.imprint_new_labels": "off"},
    "mean pooling": {"model.pooling": "mean", "trainer.imprint_new_labels": "off"},
    "mean pooling + imprinting": {"model.pooling": "mean", "trainer.imprint_new_labels": "on"},
}
EVENTS = 480


def events_of(dataset: str) -> list[Any]:
    from dynft.events import Event

    if dataset != "banking77":
        rows = read(DATA / dataset / "train.jsonl")[:EVENTS]
    else:  # intents arrive 8 at a time: 3 phases of 8 intents x 8 events, shuffled within a phase
        by_label: dict[str, list[dict[str, Any]]] = {}
        for row in read(DATA / dataset / "train.jsonl"):
            by_label.setdefault(row["label"], []).append(row)
        intents = sorted(by_label)[:24]
        rng = random.Random(0)
        rows = []
        for phase in range(3):
            chunk = [r for label in intents[8 * phase : 8 * phase + 8] for r in by_label[label][:8]]
            rng.shuffle(chunk)
            rows += chunk
    return [Event(id=str(i), text=r["text"], label=r["label"]) for i, r in enumerate(rows)]


def prequential(dataset: str, overrides: dict[str, Any], lr_scale: float) -> float:
    from dynft.settings import load_settings
    from dynft.trainer import build_trainer

    defaults = load_settings().trainer
    settings = load_settings(
        overrides={
            "model.max_length": 32,
            "trainer.lr": defaults.lr * lr_scale,
            "trainer.head_lr": defaults.head_lr * lr_scale,
            **overrides,
        }
    )
    trainer = build_trainer(settings.model, settings.adapter, settings.trainer)
    events = events_of(dataset)
    rng = random.Random(0)
    hits = []
    for i in range(0, len(events), 8):
        fresh = events[i : i + 8]
        replay = [rng.choice(events[:i]) for _ in range(8)] if i else []
        result = trainer.step(trainer.collator(fresh + replay, n_fresh=len(fresh)))
        hits += [p == e.label for p, e in zip(result.predictions, fresh, strict=True)]
    return sum(hits) / len(hits)


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    datasets = ("sst2", "ag_news", "banking77")
    print("| variant | learning rates | SST-2 | AG News | BANKING77, 8 intents at a time |\n|---|---|---|---|---|")
    for variant, overrides in VARIANTS.items():
        for lr_scale, lr_name in ((0.5, "half"), (1.0, "shipped")):
            accs = [100 * prequential(dataset, overrides, lr_scale) for dataset in datasets]
            print(f"| {variant} | {lr_name} | " + " | ".join(f"{a:.1f}" for a in accs) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
