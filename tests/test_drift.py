from __future__ import annotations

import math
import random
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from dynft.drift import DriftMonitor, available_detectors, make_detector
from dynft.errors import ConfigError
from dynft.loop import TrainingLoop
from dynft.registry import AdapterRegistry
from dynft.settings import Settings, load_settings

from helpers import keyword_events, write_jsonl


def default_monitor() -> DriftMonitor:
    d = load_settings().drift
    return DriftMonitor(d.error_detector, d.error_params, d.loss_detector, d.loss_params)


def learner_stream(rng: random.Random, n: int, error_rate: float) -> list[tuple[bool, float]]:
    """0/1 errors and cross-entropy-like losses: small when right, large when wrong."""
    out = []
    for _ in range(n):
        wrong = rng.random() < error_rate
        p_true = rng.uniform(0.02, 0.45) if wrong else rng.uniform(0.6, 0.999)
        out.append((wrong, -math.log(p_true)))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_default_detectors_stay_quiet_on_a_stationary_stream(seed: int) -> None:
    monitor = default_monitor()
    for error, loss in learner_stream(random.Random(seed), 5000, error_rate=0.15):
        assert not monitor.update(error, loss)


@pytest.mark.parametrize("seed", range(5))
def test_default_detectors_fire_soon_after_a_label_flip(seed: int) -> None:
    rng = random.Random(seed)
    monitor = default_monitor()
    stream = learner_stream(rng, 3000, 0.15) + learner_stream(rng, 300, 0.85)
    hits = [i for i, (error, loss) in enumerate(stream) if monitor.update(error, loss)]
    assert hits and 3000 <= hits[0] < 3300


def test_any_river_detector_by_name() -> None:
    assert {"ADWIN", "PageHinkley", "KSWIN", "DDM", "HDDMA"} <= set(available_detectors())
    assert make_detector("KSWIN", {"window_size": 50, "stat_size": 20, "seed": 1}) is not None
    with pytest.raises(ConfigError, match=r"'Nope' is not in river\.drift"):
        make_detector("Nope", {})
    with pytest.raises(ConfigError, match="rejects parameters"):
        make_detector("ADWIN", {"bogus": 1})
    with pytest.raises(ConfigError, match="only takes 0/1 input"):
        DriftMonitor("ADWIN", {}, "DDM", {})


def run_stream(
    settings: Settings, rows: list[dict[str, object]], tmp_path: Path, metrics: CollectorRegistry | None = None
) -> TrainingLoop:
    settings.source.uri = f"file:{write_jsonl(tmp_path / 'stream.jsonl', rows)}"
    settings.source.exit_at_end = True
    settings.evaluation.holdout_fraction = 0.0  # every event is prequential: indices match the stream
    loop = TrainingLoop(settings, metrics)
    thread = threading.Thread(target=loop.run)
    thread.start()
    thread.join(timeout=240)
    assert not thread.is_alive(), "the loop did not finish the stream"
    assert loop.prequential.seen == len(rows)
    return loop


@pytest.mark.slow
def test_real_trainer_stationary_stream_of_5000_events_raises_no_drift(tiny_settings: Settings, tmp_path: Path) -> None:
    """The daemon's own error and loss streams, from the real (tiny) model learning a stationary task."""
    tiny_settings.drift.reactions = []
    # The label detector sees only the labels (no model): its alarm rate on stationary label streams
    # (about 1 in 8,600 events; one here, at event 4374) is measured in benchmarks/results/quality/drift-quick.md.
    tiny_settings.drift.label_detector = "NoDrift"
    loop = run_stream(tiny_settings, keyword_events(5000, ["alpha", "beta", "gamma"], seed=3), tmp_path)
    assert loop.prequential.accuracy > 0.8, "the model did not learn: the test would prove nothing"
    assert list(loop.drift.history) == []


@pytest.mark.slow
def test_real_trainer_label_flip_is_detected_within_300_events(tiny_settings: Settings, tmp_path: Path) -> None:
    labels = ["alpha", "beta", "gamma"]
    before = keyword_events(2500, labels, seed=4)
    flipped = keyword_events(
        2000, labels, seed=5, start=2500, relabel={"alpha": "beta", "beta": "gamma", "gamma": "alpha"}
    )
    tiny_settings.drift.reactions = ["boost", "upweight", "new_lineage"]
    tiny_settings.registry.keep_last = 1000  # the first lineage's versions stay to be compared
    metrics = CollectorRegistry()
    loop = run_stream(tiny_settings, before + flipped, tmp_path, metrics)
    indices = [d.index for d in loop.drift.history]
    assert indices, "no drift detected after the label flip"
    assert 2500 <= indices[0] < 2800, indices
    # The reactions ran: a new lineage was started, and later versions carry it.
    for reaction in ("boost", "upweight", "new_lineage"):
        assert metrics.get_sample_value("dynft_drift_reactions_total", {"reaction": reaction}) >= 1
    registry = AdapterRegistry(tiny_settings.registry_dir, keep_last=1000)
    lineages = [registry.meta(v)["lineage"] for v in registry.versions()]
    assert lineages[0] == 1 and lineages[-1] >= 2 and lineages == sorted(lineages)
    # Chance is about 1/3 (three balanced labels). The rolling accuracy at the end depends on how
    # the batching thread's timing cut the batches, which varies under load (0.67 to 0.8 seen on
    # 2 busy cores), so the bar is "clearly learned", not a tuned figure.
    assert loop.prequential.accuracy > 0.6, "after the reset the new lineage learned the flipped concept"


# Detectors on the label distribution and on the input representation (issue #17, item 4): exact
# detection indices on seeded streams, as river's own tests give them, and no alarm without a shift.
LABEL_PH = {"min_instances": 20, "delta": 0.15, "threshold": 2.0, "mode": "up"}  # on two windows of 20 labels
REPRESENTATION_PH = {"min_instances": 5, "delta": 0.5, "threshold": 5.0, "mode": "up"}  # on windows' z-scores


def label_stream(rng: random.Random, n: int, share_pos: float) -> list[str]:
    return [rng.choices(["pos", "neg"], [share_pos, 1 - share_pos])[0] for _ in range(n)]


def test_the_label_shift_detector_sees_a_change_of_label_shares() -> None:
    from dynft.drift import LabelShiftDetector

    rng = random.Random(1)
    shifted = label_stream(rng, 600, 0.8) + label_stream(rng, 400, 0.2)
    detector = LabelShiftDetector("PageHinkley", LABEL_PH)
    assert [i for i, y in enumerate(shifted) if detector.update(y)] == [617]
    stable = label_stream(rng, 1000, 0.8)
    detector = LabelShiftDetector("PageHinkley", LABEL_PH)
    assert [i for i, y in enumerate(stable) if detector.update(y)] == []


def test_the_representation_shift_detector_sees_inputs_move() -> None:
    import numpy as np

    from dynft.drift import RepresentationShiftDetector

    g = np.random.default_rng(3)
    shifted = list(g.normal(0, 1, (600, 32))) + list(g.normal(0, 1, (400, 32)) + 1.0)
    detector = RepresentationShiftDetector("PageHinkley", REPRESENTATION_PH, width=32, seed=0)
    assert [i for i, x in enumerate(shifted) if detector.update(x)] == [609]
    stable = list(g.normal(0, 1, (1000, 32)))
    detector = RepresentationShiftDetector("PageHinkley", REPRESENTATION_PH, width=32, seed=0)
    assert [i for i, x in enumerate(stable) if detector.update(x)] == []


def test_a_shift_spread_over_every_dimension_is_seen_even_into_a_narrower_kind_of_input() -> None:
    """A move of one standard deviation along every dimension of a 384-wide embedding, into inputs
    as varied as before or five times less varied (texts of one kind after a mixed stream, which a
    distance from the mean would see come *closer*): both seen within 10 events; no move, no alarm."""
    import numpy as np

    from dynft.drift import RepresentationShiftDetector

    g = np.random.default_rng(5)
    base = list(g.normal(0, 1, (600, 384)))
    for spread in (1.0, 0.2):
        detector = RepresentationShiftDetector("PageHinkley", REPRESENTATION_PH, width=384)
        after = list(g.normal(0, spread, (300, 384)) + 1.0)
        assert [i for i, x in enumerate(base + after) if detector.update(x)] == [609]
    detector = RepresentationShiftDetector("PageHinkley", REPRESENTATION_PH, width=384)
    assert [i for i, x in enumerate(g.normal(0, 1, (900, 384))) if detector.update(x)] == []


def review_like(rng: random.Random, n: int) -> list[str]:
    words = [
        "the",
        "film",
        "is",
        "a",
        "quiet",
        "and",
        "moving",
        "story",
        "of",
        "love",
        "loss",
        "with",
        "fine",
        "acting",
    ]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) + " ." for _ in range(n)]


def tweet_like(rng: random.Random, n: int) -> list[str]:
    words = ["@united", "FLIGHT", "delayed", "again!!", "#fail", "gate", "3hrs", "thanks", "NOT", "happy"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def test_the_input_shift_detector_sees_another_kind_of_text_and_not_the_same_kind() -> None:
    from dynft.drift import InputShiftDetector
    from dynft.settings import DriftSettings

    d = DriftSettings()
    rng = random.Random(5)
    shifted = review_like(rng, 600) + tweet_like(rng, 300)
    detector = InputShiftDetector(d.input_detector, d.input_params, d.input_window)
    assert [i for i, t in enumerate(shifted) if detector.update(t)] == [609]
    stable = review_like(rng, 3000)  # long texts and short ones, in any order: no shift
    detector = InputShiftDetector(d.input_detector, d.input_params, d.input_window)
    assert [i for i, t in enumerate(stable) if detector.update(t)] == []


def test_the_monitor_reports_input_shifts_from_the_texts_it_is_given_and_none_when_off() -> None:
    from dynft.settings import DriftSettings

    rng = random.Random(6)
    texts = review_like(rng, 400) + tweet_like(rng, 200)
    monitor = DriftMonitor.from_settings(DriftSettings())
    assert monitor.streams["input"] == "PageHinkley"
    hits = [d for t in texts for d in monitor.update(False, 0.1, "a", text=t)]
    assert [(d.stream, d.index) for d in hits] == [("input", 409)]
    quiet = DriftMonitor.from_settings(DriftSettings(input_detector="NoDrift"))
    assert "input" not in quiet.streams
    assert [d for t in texts for d in quiet.update(False, 0.1, "a", text=t)] == []
