"""The model-size experiment's merged table and plot, on rows made up here (no model is run)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.quality import sizereport  # noqa: E402
from benchmarks.quality.paradigms import main  # noqa: E402


def row(model: str, config: str, dataset: str, seed: int, acc: float, cpu: float = 0.05) -> dict[str, Any]:
    return {
        "model": model,
        "config": config,
        "dataset": dataset,
        "seed": seed,
        "test_accuracy": acc,
        "prequential_accuracy": acc - 0.1,
        "trainable_params": 1000 if config == "head only" else 20000,
        "saved_bytes": 4096,
        "train_events": 300,
        "test_events": 250,
        "cpu_seconds_per_example": cpu,
    }


def test_seeds_are_averaged_over_common_datasets_and_a_seed_cut_short_is_left_out(tmp_path: Path) -> None:
    small = [
        row("minilm", "LoRA r=8", "sst2", 0, 0.80),
        row("minilm", "LoRA r=8", "mr", 0, 0.70),
        row("minilm", "LoRA r=8", "sst2", 1, 0.90),
        row("minilm", "LoRA r=8", "mr", 1, 0.60),
        row("minilm", "LoRA r=8", "sst2", 2, 0.10),  # seed 2 was cut short before mr: not in the average
        row("minilm", "head only", "sst2", 0, 0.50, cpu=0.02),
        row("minilm", "head only", "mr", 0, 0.70, cpu=0.04),
    ]
    big = [row("mpnet", "LoRA r=8", "sst2", 0, 0.95, cpu=0.3), row("mpnet", "LoRA r=8", "mr", 0, 0.85, cpu=0.3)]
    big.append(row("mpnet", "LoRA r=8", "trec6", 0, 0.2, cpu=0.3))  # only mpnet has trec6: not in the average
    inputs = [tmp_path / "a.json", tmp_path / "b.json"]
    inputs[0].write_text(json.dumps({"rows": small}))
    rerun = {**small[0], "test_accuracy": 0.82}  # the same seed measured again: the last file wins
    inputs[1].write_text(json.dumps({"rows": [*big, rerun]}))

    rows = sizereport.merge([json.loads(p.read_text()) for p in inputs])
    assert len(rows) == len(small) + len(big)
    assert sizereport.common_datasets(rows) == ["sst2", "mr"]
    stats = {(s["model"], s["config"]): s for s in sizereport.summary(rows)}
    assert list(stats) == [("minilm", "head only"), ("minilm", "LoRA r=8"), ("mpnet", "LoRA r=8")]
    lora = stats[("minilm", "LoRA r=8")]
    assert lora["seeds"] == 2
    assert abs(lora["test_accuracy"] - 0.755) < 1e-9  # seed means (0.82 + 0.70) / 2 and (0.90 + 0.60) / 2
    assert abs(lora["test_accuracy_sd"] - 0.00707107) < 1e-6
    assert stats[("minilm", "head only")]["test_accuracy_sd"] is None  # one seed: no spread
    assert abs(stats[("minilm", "head only")]["cpu_seconds_per_example"] - 0.03) < 1e-9
    assert abs(stats[("mpnet", "LoRA r=8")]["test_accuracy"] - 0.90) < 1e-9

    out = tmp_path / "results" / "model-size"
    main(["report", "--inputs", *map(str, inputs), "--out", str(out)])
    markdown = out.with_suffix(".md").read_text()
    assert "| minilm | LoRA r=8 | 2 | 75.5 ± 0.7 | 65.0 ± 0.0 | 20,000 | 4 KiB | 0.050 |" in markdown
    assert "| mpnet | trec6 | LoRA r=8 | 1 | 20.0 | 10.0 |" in markdown  # per dataset: every row is shown
    assert "](model-size.png)" in markdown and "Averaged over sst2, mr" in markdown
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads(out.with_suffix(".json").read_text())["rows"]) == len(rows)
