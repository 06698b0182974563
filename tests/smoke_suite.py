"""The quality suite cut down for the tests: a tiny model, short streams, fast reactions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.quality.streams import Sizes
from benchmarks.quality.suites import QUICK, Suite


def smoke_suite(model_dir: Path, sizes: Sizes, **overrides: Any) -> Suite:
    """The quick suite on ``model_dir`` with ``sizes``, reacting and publishing within a few events."""
    return QUICK.with_overrides(
        name="smoke",
        sizes=sizes,
        model_path=str(model_dir),
        max_length=16,
        boost_steps=2,
        cooldown_events=10,
        publish_every_steps=2,
        window=8,
        detection_horizon=20,
        **overrides,
    )
