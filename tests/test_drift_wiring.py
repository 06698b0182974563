"""The label and representation detectors in the daemon, and the reaction to a confirmed concept change (#17 item 4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from test_drift import run_stream

from dynft.drift import DriftMonitor
from dynft.events import Event
from dynft.settings import Settings, load_settings
from dynft.trainer import build_trainer

from helpers import keyword_events


def events(n: int, offset: int = 0) -> list[Event]:
    return [
        Event(id=f"e{i}", text=row["text"], label=row["label"])
        for i, row in enumerate(keyword_events(n, ["alpha", "beta"], seed=offset))
    ]


def test_a_step_returns_the_fresh_rows_mean_token_embeddings_which_training_never_moves(
    tiny_settings: Settings,
) -> None:
    """The representation detector's input costs no extra forward pass, changes nothing the step
    computes, and is the same for the same texts after any amount of training (the embedding table
    is frozen), so learning alone cannot raise an alarm."""
    plain = build_trainer(tiny_settings.model, tiny_settings.adapter, tiny_settings.trainer)
    capturing = build_trainer(tiny_settings.model, tiny_settings.adapter, tiny_settings.trainer)
    capturing.capture_features = True
    forwards = []
    capturing.model.register_forward_hook(lambda *args: forwards.append(1))
    batch = events(6)
    results = []
    for trainer in (plain, capturing):
        torch.manual_seed(0)  # the same dropout masks in both
        results.append(trainer.step(trainer.collator(batch, n_fresh=4)))
    without, with_ = results
    assert len(forwards) == 1
    assert without.features is None
    assert with_.features is not None and len(with_.features) == 4
    assert with_.predictions == without.predictions and with_.losses == pytest.approx(without.losses)
    collated = capturing.collator(batch, n_fresh=4)
    table = capturing.model.get_input_embeddings().weight.detach()
    for row, ids, mask in zip(with_.features, collated.input_ids, collated.attention_mask, strict=False):
        expected = table[ids[mask.bool()]].mean(dim=0)
        assert torch.allclose(torch.tensor(row), expected, atol=1e-5)
    for _ in range(5):
        capturing.step(capturing.collator(events(6, offset=7), n_fresh=4))
    again = capturing.step(capturing.collator(batch, n_fresh=4))
    assert capturing.steps == 7 and again.features == with_.features


def test_the_monitor_reports_label_and_representation_detections_by_stream() -> None:
    import numpy as np

    label = ("PageHinkley", {"min_instances": 20, "delta": 0.15, "threshold": 2.0, "mode": "up"}, 20)
    representation = ("PageHinkley", {"min_instances": 5, "delta": 0.5, "threshold": 5.0, "mode": "up"}, 64, 10)
    monitor = DriftMonitor("NoDrift", {}, "NoDrift", {}, label=label, representation=representation)
    assert monitor.streams == {
        "error": "NoDrift",
        "loss": "NoDrift",
        "label": "PageHinkley",
        "representation": "PageHinkley",
    }
    g = np.random.default_rng(3)
    inputs = list(g.normal(0, 1, (600, 32))) + list(g.normal(0, 1, (400, 32)) + 1.0)
    labels = ["pos"] * 600 + ["neg"] * 400
    found = [d for x, y in zip(inputs, labels, strict=True) for d in monitor.update(False, 0.1, y, x)]
    assert [(d.stream, d.index) for d in found] == [("representation", 609), ("label", 611)]
    off = DriftMonitor("NoDrift", {}, "NoDrift", {}, label=("NoDrift", {}), representation=("NoDrift", {}, 64, 10))
    assert not off.wants_embeddings and set(off.streams) == {"error", "loss"}


def test_the_label_detector_survives_a_restart() -> None:
    """Labels are kept in the checkpoint's recent stream, so a restored monitor decides as the original."""
    label = ("PageHinkley", {"min_instances": 20, "delta": 0.15, "threshold": 2.0, "mode": "up"}, 20)
    labels = ["pos"] * 600 + ["neg"] * 400
    original = DriftMonitor("NoDrift", {}, "NoDrift", {}, label=label)
    for y in labels[:590]:
        original.update(False, 0.1, y)
    restored = DriftMonitor("NoDrift", {}, "NoDrift", {}, label=label)
    restored.restore(original.snapshot())
    hits = [[d.index for y in labels[590:] for d in m.update(False, 0.1, y)] for m in (original, restored)]
    assert hits[0] == hits[1] == [611]


@pytest.mark.slow
def test_a_label_permutation_retires_the_old_concepts_replay(tiny_settings: Settings, tmp_path: Path) -> None:
    """Same inputs, new labels: detected, confirmed, the buffer keeps only events from after the detection."""
    labels = ["alpha", "beta", "gamma"]
    flip = 1200
    before = keyword_events(flip, labels, seed=4)
    after = keyword_events(
        800, labels, seed=5, start=flip, relabel={"alpha": "beta", "beta": "gamma", "gamma": "alpha"}
    )
    assert tiny_settings.drift.reactions == ["boost", "upweight", "retire"]  # the shipped default
    metrics = CollectorRegistry()
    loop = run_stream(tiny_settings, before + after, tmp_path, metrics)
    retired = metrics.get_sample_value("dynft_drift_reactions_total", {"reaction": "retire"})
    assert retired == 1, "the concept change was not confirmed (or confirmed twice)"
    assert loop.reaction.lineage == 2 and loop.publisher.lineage == 2
    performance = [d.index for d in loop.drift.history if d.stream in ("error", "loss")]
    assert performance and flip <= performance[0] < flip + 300, performance
    kept = [int(e.id[1:]) for e in loop.buffer.events()]
    assert kept and min(kept) >= flip, "replayed events of the old concept survived"
    assert loop.prequential.accuracy > 0.6, "the permuted concept was learned (chance is 1/3)"


@pytest.mark.slow
def test_defaults_raise_no_alarm_from_any_detector_on_a_stationary_stream(
    tiny_settings: Settings, tmp_path: Path
) -> None:
    """The label detector on (the default) sees a stationary stream learned from scratch."""
    tiny_settings.drift.reactions = []
    assert load_settings().drift.representation_detector == "PageHinkley"
    loop = run_stream(tiny_settings, keyword_events(3000, ["alpha", "beta", "gamma"], seed=3), tmp_path)
    assert set(loop.drift.streams) == {"error", "loss", "label", "input", "representation"}
    assert loop.prequential.accuracy > 0.8, "the model did not learn: the test would prove nothing"
    assert [(d.stream, d.index) for d in loop.drift.history] == []
