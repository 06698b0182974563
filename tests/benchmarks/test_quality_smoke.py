"""The quality benchmark's harness end to end on a tiny model and very short streams (no timings asserted)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is not an installed package
    sys.path.insert(0, str(ROOT))

from smoke_suite import smoke_suite  # noqa: E402

from benchmarks.quality import report  # noqa: E402
from benchmarks.quality.harness import run_suite  # noqa: E402
from benchmarks.quality.methods import METHODS  # noqa: E402
from benchmarks.quality.paradigms import CONFIGS  # noqa: E402
from benchmarks.quality.streams import Sizes  # noqa: E402

TINY = Sizes(
    domain_per_phase=24,
    domain_test=8,
    airline_events=60,
    airline_test=4,
    banking_per_intent=1,
    banking_test_per_intent=1,
    concept_events=48,
    concept_test=8,
)


def test_the_harness_runs_every_method_and_writes_well_formed_results(tiny_model_dir: Path, tmp_path: Path) -> None:
    suite = smoke_suite(
        tiny_model_dir,
        TINY,
        paradigm_train=32,
        paradigm_test=8,
        paradigm_datasets=("sst2", "trec6"),
        anchor_streams=("domain", "airline", "banking", "concept"),
    )
    results = report.complete(run_suite(suite, workers=1, progress=lambda line: None))
    written = report.write(results, tmp_path, "python -m benchmarks.quality --suite smoke")

    data = json.loads((tmp_path / "quality-smoke.json").read_text())
    assert set(data["streams"]) == {"domain", "airline", "banking", "concept"}
    for name, stream in data["streams"].items():
        assert list(stream["methods"]) == list(METHODS), name
        phases = len(stream["phases"])
        assert len(stream["drift_points"]) == phases - 1
        for method, s in stream["methods"].items():
            assert 0.0 <= s["prequential_accuracy"] <= 1.0 and 0.0 <= s["prequential_macro_f1"] <= 1.0
            assert len(s["final_accuracy"]) == phases and len(s["phase_end_accuracy"]) == phases
            assert all(0.0 <= a <= 1.0 for a in s["final_accuracy"])
            assert len(s["recovery_events"]) == phases - 1
            assert s["events"] == stream["events"] and 0 < s["trained"] <= s["events"], (name, method)
            assert (s["detection"] is not None) == method.startswith("dynft")
        assert stream["methods"]["dynft"]["extra"]["steps"] > 0
        assert stream["methods"]["dynft"]["extra"]["versions_promoted"] >= 1  # the gate promoted something
    assert data["sizes"]["banking_per_intent"] == 1 and data["streams"]["banking"]["events"] == 77

    rows = {(r["dataset"], r["config"]): r for r in data["paradigms"]}
    assert set(rows) == {(d, c) for d in ("sst2", "trec6") for c in CONFIGS}
    params = [rows[("sst2", c)]["trainable_params"] for c in ("head only", "LoRA r=2", "LoRA r=8", "LoRA r=32")]
    assert params == sorted(params) and params[-1] < rows[("sst2", "full fine-tuning")]["trainable_params"]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["saved_bytes"] > 0 for r in rows.values())

    assert {g["stream"] for g in data["goals"]} == set(data["streams"])
    markdown = (tmp_path / "quality-smoke.md").read_text()
    assert "## Goals" in markdown and "## Fine-tuning paradigms" in markdown
    for name in data["streams"]:
        png = tmp_path / f"quality-smoke-{name}.png"
        assert png in written and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(quality-smoke-{name}.png)" in markdown
