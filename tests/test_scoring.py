"""The gate's checks (``dynft.scoring``): quick checks on the newest held-out events between full
ones, always against the last fully checked version, and fresh publishing within its budget."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

from dynft.errors import ConfigError
from dynft.evaluation import HoldoutWindow
from dynft.events import Event
from dynft.metrics import TrainerMetrics
from dynft.model import head_linear
from dynft.publisher import Publisher
from dynft.registry import AdapterRegistry
from dynft.settings import Settings, load_settings
from dynft.trainer import OnlineTrainer

from helpers import keyword_events

LABELS = ["alpha", "beta"]


def events(n: int, seed: int, prefix: str) -> list[Event]:
    return [Event(**r) for r in keyword_events(n, LABELS, seed=seed, prefix=prefix)]  # type: ignore[arg-type]


def counting(trainer: OnlineTrainer) -> list[int]:
    """Wrap ``trainer.predictions``: the number of events of every call (one forward row each)."""
    calls: list[int] = []
    original: Callable[..., list[str]] = trainer.predictions

    def predictions(batch: Sequence[Event], state: Any = None) -> list[str]:
        calls.append(len(batch))
        return original(batch, state)

    trainer.predictions = predictions  # type: ignore[method-assign]
    return calls


def make(settings: Settings, trainer: OnlineTrainer, held: int) -> tuple[Publisher, HoldoutWindow]:
    settings.registry.publish_interval_s = 3600.0  # full checks only when the test makes them due
    settings.registry.publish_every_steps = 10_000
    settings.registry.first_publish_steps = 1
    holdout = HoldoutWindow(256)
    for event in events(held, seed=99, prefix="h"):
        holdout.add(event)
    registry = AdapterRegistry(settings.registry_dir)
    return Publisher(registry, trainer, holdout, settings, TrainerMetrics(CollectorRegistry())), holdout


def train(trainer: OnlineTrainer, publisher: Publisher, steps: int, seed: int) -> None:
    for i in range(steps):
        batch = events(16, seed=seed * 1000 + i, prefix=f"t{seed}-{i}-")
        trainer.step(trainer.collator(batch, n_fresh=16))
        publisher.trained(1000.0 + i, batch)


def test_quick_checks_score_the_newest_events_against_the_last_fully_checked_version(
    tiny_settings: Settings, tiny_trainer: OnlineTrainer
) -> None:
    # The checks' mechanics, on the adapter alone: word counts (dynft.lexical) would answer these
    # keyword events right even with the broken head below, and the gate judges the served blend.
    tiny_trainer.lexicon = None
    publisher, _ = make(tiny_settings, tiny_trainer, held=96)
    train(tiny_trainer, publisher, 1, seed=1)
    assert publisher.maybe_publish({}) == 1  # first version: nothing to compare with
    train(tiny_trainer, publisher, 40, seed=2)
    calls = counting(tiny_trainer)
    assert publisher.maybe_publish({}) == 2  # fresh events trained, the trainer idle: published at once
    gate = publisher.registry.meta(2)["gate"]
    # The first check is full: the whole window, the candidate's and version 1's answers.
    assert (gate["scope"], gate["holdout_events"], gate["reference_version"]) == ("window", 96, 1)
    assert sorted(calls) == [96, 96] and gate["decision"] == "promoted"
    assert gate["candidate_accuracy"] > 0.8  # the premise of what follows: the lineage has learnt

    calls.clear()
    train(tiny_trainer, publisher, 2, seed=3)
    assert publisher.maybe_publish({}) == 3
    gate = publisher.registry.meta(3)["gate"]
    # Quick: the newest 32 only, against version 2 (whose answers on the window are known).
    assert (gate["scope"], gate["holdout_events"], gate["reference_version"]) == ("newest", 32, 2)
    assert calls == [32] and gate["decision"] == "promoted" and "on the newest 32" in gate["reason"]

    # A broken candidate (its two label rows swapped) loses on the newest events: rejected.
    train(tiny_trainer, publisher, 1, seed=4)
    flip_head(tiny_trainer)
    assert publisher.maybe_publish({}) == 4
    gate = publisher.registry.meta(4)["gate"]
    assert (gate["decision"], gate["scope"], gate["reference_version"]) == ("rejected", "newest", 2)
    assert publisher.registry.serving().version == 3

    # Quick promotions do not move the reference: version 3 served, version 2 is still compared with.
    train(tiny_trainer, publisher, 1, seed=5)
    tiny_settings.registry.publish_every_steps = 1  # a full check falls due
    calls.clear()
    assert publisher.maybe_publish({}) == 5
    gate = publisher.registry.meta(5)["gate"]
    assert (gate["scope"], gate["reference_version"], calls) == ("window", 2, [96])  # version 2's answers cached


def train_scored(trainer: OnlineTrainer, publisher: Publisher, steps: int, seed: int) -> None:
    """``train``, handing the publisher each step's prequential answers too (as the loops do)."""
    for i in range(steps):
        batch = events(16, seed=seed * 1000 + i, prefix=f"t{seed}-{i}-")
        result = trainer.step(trainer.collator(batch, n_fresh=16))
        publisher.trained(1000.0 + i, batch, result.predictions)


def flip_head(trainer: OnlineTrainer) -> None:
    """Swap the two label rows: a broken model that answers every event with the other label."""
    head = head_linear(trainer.model)
    with torch.no_grad():
        head.weight[:2] = head.weight[:2].flip(0).clone()
        if head.bias is not None:
            head.bias[:2] = head.bias[:2].flip(0).clone()


def test_with_too_little_held_out_the_gate_judges_on_what_was_trained_since_the_serving_version(
    tiny_settings: Settings, tiny_trainer: OnlineTrainer
) -> None:
    tiny_trainer.lexicon = None  # the check's mechanics on the adapter alone (word counts would carry the broken head)
    publisher, holdout = make(tiny_settings, tiny_trainer, held=4)  # min_holdout is 32
    train_scored(tiny_trainer, publisher, 1, seed=1)
    assert publisher.maybe_publish({}) == 1  # first version: nothing to compare with
    train_scored(tiny_trainer, publisher, 1, seed=2)
    assert publisher.maybe_publish({}) == 2  # 16 events since version 1: too few to judge on
    assert publisher.registry.meta(2)["gate"]["decision"] == "rejected"
    train_scored(tiny_trainer, publisher, 30, seed=3)
    calls = counting(tiny_trainer)
    assert publisher.maybe_publish({}) == 3
    gate = publisher.registry.meta(3)["gate"]
    # The newest 128 (4 x min_holdout) of the 496 events trained since version 1, each run through version 1 once.
    assert (gate["scope"], gate["holdout_events"], gate["decision"], calls) == ("prequential", 128, "promoted", [128])
    assert gate["candidate_accuracy"] > gate["serving_accuracy"] + 0.2, gate  # version 1 had seen 16 events
    assert gate["reference_version"] == 1 and "trained since it" in gate["reason"]

    flip_head(tiny_trainer)  # the lineage breaks: its answers from now on are wrong
    train_scored(tiny_trainer, publisher, 1, seed=4)
    assert publisher.maybe_publish({}) == 4
    assert "the gate needs 32" in publisher.registry.meta(4)["gate"]["reason"]  # 16 events since version 3
    train_scored(tiny_trainer, publisher, 1, seed=5)
    calls.clear()
    assert publisher.maybe_publish({}) == 5
    gate = publisher.registry.meta(5)["gate"]
    assert (gate["scope"], gate["holdout_events"], gate["decision"], calls) == ("prequential", 32, "rejected", [32])
    train_scored(tiny_trainer, publisher, 1, seed=6)
    calls.clear()
    assert publisher.maybe_publish({}) == 6
    assert calls == [16]  # version 3's answers on the earlier 32 are known
    assert publisher.registry.serving().version == 3

    for event in events(40, seed=7, prefix="h2"):  # enough held out: the held-out window judges again
        holdout.add(event)
    train_scored(tiny_trainer, publisher, 1, seed=8)
    assert publisher.maybe_publish({}) == 7
    assert publisher.registry.meta(7)["gate"]["scope"] == "window"


def test_an_operators_promotion_makes_the_serving_version_the_reference_with_a_full_check(
    tiny_settings: Settings, tiny_trainer: OnlineTrainer
) -> None:
    publisher, _ = make(tiny_settings, tiny_trainer, held=64)
    train(tiny_trainer, publisher, 1, seed=1)
    assert publisher.maybe_publish({}) == 1
    train(tiny_trainer, publisher, 40, seed=2)
    assert publisher.maybe_publish({}) == 2
    assert publisher.scorer.reference == 2  # promoted after a full check
    publisher.registry.promote(1, reason="operator rollback")
    calls = counting(tiny_trainer)
    train(tiny_trainer, publisher, 1, seed=4)
    version = publisher.maybe_publish({})
    gate = publisher.registry.meta(version or 0)["gate"]
    assert (gate["scope"], gate["reference_version"], sorted(calls)) == ("window", 1, [64, 64])


def test_fresh_publishing_keeps_to_its_budget_while_work_waits_and_not_while_the_trainer_idles(
    tiny_settings: Settings, tiny_trainer: OnlineTrainer
) -> None:
    tiny_settings.registry.publish_budget = 0.001  # a publish of a few ms holds the next back for seconds
    publisher, _ = make(tiny_settings, tiny_trainer, held=64)
    waiting = [True]
    publisher.waiting = lambda: waiting[0]
    train(tiny_trainer, publisher, 1, seed=1)
    assert publisher.maybe_publish({}) == 1  # cold start
    train(tiny_trainer, publisher, 1, seed=2)
    assert publisher.maybe_publish({}) is None  # work waits: within the budget, not yet
    waiting[0] = False
    assert publisher.maybe_publish({}) == 2  # the trainer would wait anyway: at once
    assert publisher.maybe_publish({}) is None  # nothing new trained since
    tiny_settings.registry.publish_fresh = False
    train(tiny_trainer, publisher, 1, seed=3)
    assert publisher.maybe_publish({}) is None  # only the step and time schedule publish


def test_quick_checks_that_could_not_judge_are_a_configuration_error(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match=r"gate\.quick_events"):
        load_settings(overrides={"state_dir": str(tmp_path), "gate.quick_events": 8})
    assert load_settings(overrides={"state_dir": str(tmp_path), "gate.quick_events": 0}).gate.quick_events == 0
