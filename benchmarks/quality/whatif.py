"""What would make dynft learn faster on short streams? ``python -m benchmarks.quality.whatif``.

A diagnostic, not part of the suites: dynft's trainer on the first 480 events of SST-2 and
AG News (8 fresh + 8 replayed events per step, as the loop does), prequential accuracy, with

- ``default``: dynft as shipped: the sequence-classification head reads the [CLS] pooler
  (dense + tanh), which all-MiniLM-L6-v2 was never trained to use;
- ``mean pooling``: the pooler replaced by the attention-masked mean of the last hidden states
  (what all-MiniLM-L6-v2 was trained for), patched in here from outside dynft;
- ``lr x3``: adapter and head learning rates three times dynft's defaults;
- both.
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any

import torch
from torch import nn

from benchmarks.quality.streams import DATA, read

VARIANTS = ("default", "mean pooling", "lr x3", "mean pooling + lr x3")
EVENTS = 480


def mean_pooling(trainer: Any) -> None:
    """Swap the BERT pooler of a dynft trainer's model for masked mean pooling."""
    bert = trainer.model.base_model.model.bert
    mask: dict[str, torch.Tensor] = {}

    def keep_mask(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        mask["value"] = kwargs["attention_mask"]

    class MeanPool(nn.Module):
        def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, H)
            m = mask["value"].unsqueeze(-1).to(hidden.dtype)
            return (hidden * m).sum(1) / m.sum(1).clamp_min(1)

    bert.register_forward_pre_hook(keep_mask, with_kwargs=True)
    bert.pooler = MeanPool()


def prequential(dataset: str, variant: str) -> float:
    from dynft.events import Event
    from dynft.settings import load_settings
    from dynft.trainer import build_trainer

    scale = 3.0 if "lr x3" in variant else 1.0
    overrides = {"model.max_length": 32, "trainer.lr": 1e-3 * scale, "trainer.head_lr": 3e-3 * scale}
    settings = load_settings(overrides=overrides)
    trainer = build_trainer(settings.model, settings.adapter, settings.trainer)
    if "mean pooling" in variant:
        mean_pooling(trainer)
    rows = read(DATA / dataset / "train.jsonl")[:EVENTS]
    events = [Event(id=str(i), text=r["text"], label=r["label"]) for i, r in enumerate(rows)]
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
    print(f"| variant | SST-2 ({EVENTS} events) | AG News ({EVENTS} events) |\n|---|---|---|")
    for variant in VARIANTS:
        accs = [100 * prequential(dataset, variant) for dataset in ("sst2", "ag_news")]
        print(f"| {variant} | {accs[0]:.1f} | {accs[1]:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
