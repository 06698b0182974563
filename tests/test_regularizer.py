"""The anti-forgetting regulariser: an L2 pull toward the serving version (``trainer.anchor_weight``)."""

from __future__ import annotations

import math

import pytest
import torch
from prometheus_client import CollectorRegistry

from dynft.evaluation import HoldoutWindow
from dynft.events import Event
from dynft.metrics import TrainerMetrics
from dynft.publisher import Publisher
from dynft.registry import AdapterRegistry
from dynft.settings import Settings
from dynft.trainer import OnlineTrainer, build_trainer

from helpers import keyword_events


def events(n: int, labels: list[str], seed: int, **kw: object) -> list[Event]:
    return [Event(**r) for r in keyword_events(n, labels, seed=seed, **kw)]  # type: ignore[arg-type]


def trainer_with(settings: Settings, anchor_weight: float) -> OnlineTrainer:
    trainer_settings = settings.trainer.model_copy(update={"anchor_weight": anchor_weight})
    return build_trainer(settings.model, settings.adapter, trainer_settings)  # seeds torch: same init each time


def train(trainer: OnlineTrainer, stream: list[Event]) -> None:
    for i in range(0, len(stream), 16):
        chunk = stream[i : i + 16]
        assert trainer.step(trainer.collator(chunk, n_fresh=len(chunk))).skipped is None


def distance_to_anchor(trainer: OnlineTrainer) -> float:
    """Euclidean distance between the live weights and the anchor (head rows of the anchor's labels)."""
    anchor = trainer.forgetting.anchor
    assert anchor is not None
    params = trainer.slots.capture()
    total = 0.0
    for key, value in anchor.items():
        live = params[key].detach()[: value.shape[0]] if key in trainer.slots.head_keys else params[key].detach()
        total += float((live - value).pow(2).sum())
    return math.sqrt(total)


def learn_then_drift(trainer: OnlineTrainer) -> float:
    """Learn alpha/beta, anchor there, then learn a flipped concept with a new label; distance at the end."""
    train(trainer, events(320, ["alpha", "beta"], seed=1))
    trainer.anchor_to(trainer.export())
    drifted = events(320, ["alpha", "beta", "gamma"], seed=2, relabel={"alpha": "beta", "beta": "alpha"})
    train(trainer, drifted)  # a third label grows the head past the anchor's rows
    return distance_to_anchor(trainer)


def test_a_large_anchor_weight_keeps_the_adapter_close_to_the_anchor(tiny_settings: Settings) -> None:
    free = learn_then_drift(trainer_with(tiny_settings, 0.0))
    held = learn_then_drift(trainer_with(tiny_settings, 50.0))
    assert free > 0.5  # the drift moved the unanchored weights a long way
    assert held < 0.5 * free


def test_weight_zero_leaves_the_step_unchanged(tiny_settings: Settings) -> None:
    def final_weights(anchored: bool) -> dict[str, torch.Tensor]:
        trainer = trainer_with(tiny_settings, 0.0)
        train(trainer, events(64, ["alpha", "beta"], seed=3))
        if anchored:
            trainer.anchor_to(trainer.export())
        train(trainer, events(64, ["alpha", "beta", "gamma"], seed=4))
        return {k: p.detach().clone() for k, p in trainer.slots.capture().items()}

    plain, anchored = final_weights(False), final_weights(True)
    assert plain.keys() == anchored.keys()
    for key in plain:
        assert torch.equal(plain[key], anchored[key]), key


def test_the_penalty_is_half_the_weight_times_the_squared_distance(tiny_settings: Settings) -> None:
    trainer = trainer_with(tiny_settings, 4.0)
    train(trainer, events(32, ["alpha", "beta"], seed=5))
    assert trainer.forgetting.pull() is None  # no anchor yet: nothing to pull toward
    trainer.anchor_to(trainer.export())
    train(trainer, events(32, ["alpha", "beta"], seed=6))
    penalty = trainer.forgetting.pull()
    assert penalty is not None
    assert float(penalty.detach()) == pytest.approx(0.5 * 4.0 * distance_to_anchor(trainer) ** 2, rel=1e-4)
    trainer.reset_adapter()  # a new lineage drops the anchor
    assert trainer.forgetting.pull() is None


def test_a_promoted_version_becomes_the_anchor(tiny_settings: Settings, tiny_trainer: OnlineTrainer) -> None:
    registry = AdapterRegistry(tiny_settings.registry_dir)
    publisher = Publisher(registry, tiny_trainer, HoldoutWindow(64), tiny_settings, TrainerMetrics(CollectorRegistry()))
    train(tiny_trainer, events(32, ["alpha", "beta"], seed=7))
    version = publisher.maybe_publish({}, force=True)  # the first version is promoted without a comparison
    assert version is not None and publisher.serving_version == version
    assert distance_to_anchor(tiny_trainer) == 0.0
    served, _ = registry.load(version)
    assert tiny_trainer.forgetting.anchor is not None
    for key, tensor in served.tensors.items():
        assert torch.equal(tiny_trainer.forgetting.anchor[key].cpu(), tensor)


def anchored_settings(settings: Settings, weight: float) -> Settings:
    return settings.model_copy(update={"trainer": settings.trainer.model_copy(update={"anchor_weight": weight})})


def publisher_for(registry: AdapterRegistry, trainer: OnlineTrainer, settings: Settings) -> Publisher:
    return Publisher(registry, trainer, HoldoutWindow(64), settings, TrainerMetrics(CollectorRegistry()))


def first_version(settings: Settings, seed: int) -> tuple[AdapterRegistry, OnlineTrainer, Publisher, int]:
    """A trainer with anchor weight 1 that published (and so promoted) its first version."""
    registry = AdapterRegistry(settings.registry_dir)
    trainer = trainer_with(settings, 1.0)
    publisher = publisher_for(registry, trainer, settings)
    train(trainer, events(32, ["alpha", "beta"], seed=seed))
    version = publisher.maybe_publish({}, force=True)
    assert version is not None and publisher.serving_version == version
    return registry, trainer, publisher, version


def test_a_restart_anchors_to_the_serving_version_again(tiny_settings: Settings) -> None:
    """The anchor is not checkpointed: resume (from the registry) and restore (from a checkpoint) reload it."""
    settings = anchored_settings(tiny_settings, 1.0)
    registry, first, publisher, version = first_version(settings, seed=8)
    served, _ = registry.load(version)
    train(first, events(32, ["alpha", "beta", "gamma"], seed=9))  # moves on past what serves

    for how in ("resume", "restore"):
        trainer = trainer_with(settings, 1.0)
        again = publisher_for(registry, trainer, settings)
        if how == "resume":
            again.resume()  # loads the newest version, the serving one here
        else:
            trainer.load(first.export())  # a checkpoint's weights: a label ahead of the serving version
            again.restore(publisher.snapshot())
        assert trainer.forgetting.anchor is not None, how
        assert trainer.forgetting.anchor.keys() == served.tensors.keys()
        for key, tensor in served.tensors.items():
            assert torch.equal(trainer.forgetting.anchor[key].cpu(), tensor), (how, key)


def test_a_restart_does_not_anchor_to_another_lineage_or_when_off(tiny_settings: Settings) -> None:
    settings = anchored_settings(tiny_settings, 1.0)
    registry, first, publisher, _ = first_version(settings, seed=10)
    snapshot = publisher.snapshot()

    off = trainer_with(tiny_settings, 0.0)
    publisher_for(registry, off, tiny_settings).resume()
    assert off.forgetting.anchor is None  # anchor_weight 0: nothing is loaded

    other = trainer_with(settings, 1.0)
    other.load(first.export())
    later = publisher_for(registry, other, settings)
    later.restore({**snapshot, "lineage": snapshot["lineage"] + 1})  # a drift reset started a new lineage
    assert other.forgetting.anchor is None
