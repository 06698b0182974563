"""The forgetting table's variants and report (the training runs themselves are left out: slow)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.quality.forgetting import METHODS, markdown  # noqa: E402
from benchmarks.quality.methods import DYNFT_VARIANTS  # noqa: E402
from benchmarks.quality.methods import METHODS as SUITE_METHODS  # noqa: E402
from benchmarks.quality.suites import LWF_WEIGHT, QUICK, dynft_overrides  # noqa: E402
from dynft.settings import load_settings  # noqa: E402


def test_each_variant_switches_on_its_own_penalty_and_only_it() -> None:
    penalties = ("trainer.anchor_weight", "trainer.lwf_weight", "trainer.ewc_weight")
    on = {}
    for method in METHODS:
        overrides = dynft_overrides(QUICK, DYNFT_VARIANTS[method])
        load_settings(overrides=overrides)  # every variant is a valid configuration
        on[method] = {key: overrides[key] for key in penalties if overrides.get(key)}
    assert on == {
        "dynft": {},
        "dynft + anchor": {"trainer.anchor_weight": QUICK.anchor_weight},
        "dynft + LwF": {"trainer.lwf_weight": LWF_WEIGHT},
        "dynft + EWC": {"trainer.ewc_weight": QUICK.anchor_weight},
    }
    assert "dynft + LwF" not in SUITE_METHODS and "dynft + EWC" not in SUITE_METHODS  # the main suite is unchanged


def test_the_table_compares_bwt_with_replay_alone() -> None:
    def row(bwt: float) -> dict[str, object]:
        return {"prequential_accuracy": 0.9, "backward_transfer": bwt, "final_accuracy": [0.5, 1.0]}

    results = {
        "suite": "quick",
        "seconds": 10.0,
        "weights": {"anchor_weight": 0.01, "ewc_weight": 0.01, "lwf_weight": 1.0},
        "streams": {"banking": {"dynft": row(-0.4), "dynft + EWC": row(-0.2)}},
    }
    text = markdown(results, "cmd", "machine")
    assert "| replay | 0.900 | -0.400 | +0% | 0.50 / 1.00 |" in text
    assert "| replay + EWC | 0.900 | -0.200 | +50% | 0.50 / 1.00 |" in text
