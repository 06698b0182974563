"""The drift table's model-free measure of what changes at a drift point (``change_at``)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.quality.drift import change_at, label_distance  # noqa: E402
from benchmarks.quality.streams import Phase, Stream  # noqa: E402


def stream_of(before: list[tuple[str, str]], after: list[tuple[str, str]]) -> Stream:
    return Stream("s", "test", before + after, [Phase("a", 0, []), Phase("b", len(before), [])])


def sample(rng: random.Random, n: int, mix: dict[str, float], words: int) -> list[tuple[str, str]]:
    labels = list(mix)
    return [
        (" ".join(["word"] * rng.randint(words, words + 4)), rng.choices(labels, [mix[x] for x in labels])[0])
        for _ in range(n)
    ]


def test_label_distance_is_the_total_variation_of_the_label_mixes() -> None:
    assert label_distance(["a", "b"], ["b", "a"]) == 0.0
    assert label_distance(["a", "a"], ["b", "b"]) == 1.0
    assert label_distance(["a", "a", "a", "b"], ["a", "b"]) == 0.25


def test_a_real_change_rises_above_the_noise_and_no_change_stays_under_it() -> None:
    rng = random.Random(1)
    same = stream_of(sample(rng, 100, {"x": 0.5, "y": 0.5}, 5), sample(rng, 100, {"x": 0.5, "y": 0.5}, 5))
    moved = stream_of(sample(rng, 100, {"x": 0.5, "y": 0.5}, 5), sample(rng, 100, {"x": 0.9, "y": 0.1}, 15))
    quiet, loud = change_at(same, 100, 100), change_at(moved, 100, 100)
    assert quiet["label"] < quiet["label_noise95"] and quiet["length"] < quiet["length_noise95"]
    assert loud["label"] > loud["label_noise95"] and loud["length"] > loud["length_noise95"]
    assert change_at(moved, 100, 100) == loud  # seeded: the same table on every run
