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

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.quality.args import datasets_in, known_names, one_or_more
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
        # Every non-LoRA tensor is the head's: MPNet's head has a dense layer before its output row.
        tensors = {k: t for k, t in state.tensors.items() if "lora_" not in k}
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
        prequential = 0  # test-then-train: each step's predictions come before it learns the batch
        for i in range(0, len(events), BATCH):
            chunk = events[i : i + BATCH]
            result = trainer.step(trainer.collator(chunk, n_fresh=len(chunk)))
            prequential += sum(p == e.label for p, e in zip(result.predictions, chunk, strict=True))
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)  # head grown by now
        predicted = trainer.predict(probes, trainer.exported_labels())
        size = saved_bytes(trainer, config, tmp)
    return {
        "dataset": dataset,
        "config": config,
        "model": suite.model_path or "minilm",
        "seed": suite.extra_settings.get("trainer.seed", 0),
        "test_accuracy": sum(p == e.label for p, e in zip(predicted, probes, strict=True)) / len(probes),
        "prequential_accuracy": prequential / max(1, len(events)),
        "trainable_params": trainable,
        "saved_bytes": size,
        "train_seconds": seconds,
        "train_cpu_seconds": cpu,  # unlike the wall time, not inflated by waiting for a busy core
        "train_events": len(events),
        "test_events": len(probes),
        "skipped_steps": trainer.skipped,
    }


# The model-size axis: name -> how to find the model (None: the packaged all-MiniLM-L6-v2, 22M).
MODEL_SIZES: dict[str, str | None] = {"minilm": None, "mpnet": "mpnet"}  # mpnet: all-mpnet-base-v2, 110M


def model_path(name: str) -> str | None:
    """The directory of a model of the size axis; MPNet is fetched into the cache on first use."""
    fetched = MODEL_SIZES[name]
    if fetched is None:
        return None
    from benchmarks.models import fetch

    return str(fetch(fetched))


def size_grid(
    suite: Suite,
    models: list[str],
    datasets: list[str],
    configs: list[str],
    seeds: int,
    data: Path = DATA,
    on_row: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Model size x fine-tuning configuration x dataset x seed, one process, in order (a batch experiment).

    ``on_row`` sees the rows so far after each one, so a run cut short keeps what it measured.
    """
    rows: list[dict[str, Any]] = []
    for name in models:
        path = model_path(name)
        for seed in range(seeds):
            extra = suite.extra_settings | {"trainer.seed": seed}
            sized = suite.with_overrides(model_path=path, extra_settings=extra)
            for dataset in datasets:
                for config in configs:
                    cpu = time.process_time()
                    row = run_paradigm(dataset, config, sized, data)
                    row["model"], row["cpu_seconds"] = name, time.process_time() - cpu
                    row["cpu_seconds_per_example"] = row["train_cpu_seconds"] / max(1, row["train_events"])
                    rows.append(row)
                    if on_row is not None:
                        on_row(rows)
                    print(f"{name} seed {seed} {dataset} {config}: {row['test_accuracy']:.3f}", flush=True)
    return rows


def size_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table: mean over seeds of each (model, configuration, dataset)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["config"], row["dataset"]), []).append(row)
    lines = [
        "| model | configuration | dataset | seeds | test acc. | prequential acc. | trainable | on disk "
        "| CPU s / example |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, config, dataset), group in groups.items():
        mean = {k: sum(r[k] for r in group) / len(group) for k in ("test_accuracy", "prequential_accuracy")}
        first = group[0]
        per_example = sum(r["cpu_seconds_per_example"] for r in group) / len(group)
        lines.append(
            f"| {model} | {config} | {dataset} | {len(group)} | {mean['test_accuracy']:.3f} | "
            f"{mean['prequential_accuracy']:.3f} | {first['trainable_params']:,} | "
            f"{first['saved_bytes'] / 2**20:.2f} MiB | {per_example:.3f} |"
        )
    return "\n".join(lines) + "\n"


def report(argv: list[str]) -> None:
    """``report --inputs A.json B.json [--out PREFIX]``: the merged table and plot (benchmarks.quality.sizereport)."""
    import argparse

    from benchmarks.quality import sizereport

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quality.paradigms report", description=sizereport.__doc__
    )
    parser.add_argument("--inputs", type=Path, nargs="+", required=True, help="JSON files this module wrote")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality/model-size"))
    args = parser.parse_args(argv)
    command = "python -m benchmarks.quality.paradigms report " + " ".join(argv)
    for path in sizereport.write(args.inputs, args.out, command):
        print(f"wrote {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    from benchmarks.quality.suites import SUITES

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        report(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.paradigms", description=size_grid.__doc__)
    parser.add_argument("--models", default="minilm,mpnet", help=f"comma-separated, of {sorted(MODEL_SIZES)}")
    parser.add_argument("--datasets", default=",".join(SUITES["full"].paradigm_datasets))
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, of the CONFIGS")
    parser.add_argument("--train", type=one_or_more, default=300, help="training examples per dataset (one pass)")
    parser.add_argument("--test", type=one_or_more, default=250, help="test rows per dataset")
    parser.add_argument("--seeds", type=one_or_more, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality/model-size"))
    args = parser.parse_args(argv)
    models, configs = args.models.split(","), args.configs.split(",")
    if unknown := [m for m in models if m not in MODEL_SIZES] + [c for c in configs if c not in CONFIGS]:
        parser.error(f"unknown models or configurations: {unknown}")
    known_names(parser, "--datasets", args.datasets.split(","), datasets_in(DATA))
    suite = SUITES["full"].with_overrides(paradigm_train=args.train, paradigm_test=args.test)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def save(rows: list[dict[str, Any]]) -> None:
        record = {"argv": argv, "wall_seconds": time.perf_counter() - started, "rows": rows}
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
        args.out.with_suffix(".md").write_text(size_table(rows))

    rows = size_grid(suite, models, args.datasets.split(","), configs, args.seeds, on_row=save)
    save(rows)
    print(size_table(rows))


if __name__ == "__main__":
    main()
