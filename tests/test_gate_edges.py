"""The gate's edge cases: a serving version that cannot be loaded, and nothing held out."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from test_loop import run

from dynft.evaluation import HoldoutWindow
from dynft.events import Event
from dynft.metrics import TrainerMetrics
from dynft.model import AdapterState
from dynft.publisher import Publisher
from dynft.registry import AdapterRegistry, VersionInfo
from dynft.settings import Settings
from dynft.trainer import OnlineTrainer

from helpers import keyword_events, write_jsonl

LABELS = ["alpha", "beta", "gamma"]


def events(n: int, seed: int, prefix: str = "e") -> list[Event]:
    return [Event(**r) for r in keyword_events(n, LABELS, seed=seed, prefix=prefix)]  # type: ignore[arg-type]


def train(trainer: OnlineTrainer, stream: list[Event]) -> None:
    for i in range(0, len(stream), 16):
        trainer.step(trainer.collator(stream[i : i + 16], n_fresh=16))


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_serving_version_that_cannot_be_loaded_is_replaced_unless_pinned(
    tiny_settings: Settings, tiny_trainer: OnlineTrainer, caplog: pytest.LogCaptureFixture
) -> None:
    registry = AdapterRegistry(tiny_settings.registry_dir)
    holdout = HoldoutWindow(64)
    publisher = Publisher(registry, tiny_trainer, holdout, tiny_settings, TrainerMetrics(CollectorRegistry()))
    train(tiny_trainer, events(32, seed=1))
    first = publisher.maybe_publish({}, force=True)
    assert first is not None and registry.serving().version == first
    for event in events(64, seed=2, prefix="h"):  # enough held-out events for a real comparison
        holdout.add(event)
    registry.promote(first, "operator", pin=True)  # pinned by an operator (promote checks it loads)
    train(tiny_trainer, events(16, seed=5))
    assert publisher.maybe_publish({}, force=True) is not None  # the gate read the serving version: loadable
    time.sleep(0.05)  # past the file system's clock tick, so that the rewrite below gets a new mtime
    corrupt(registry.path(first) / "adapter_model.safetensors")  # then the disk lies (the file changes)
    train(tiny_trainer, events(16, seed=3))
    with caplog.at_level(logging.WARNING, logger="dynft.publisher"):
        pinned = publisher.maybe_publish({}, force=True)
    assert pinned is not None and registry.meta(pinned)["gate"]["decision"] == "rejected"
    assert registry.serving().version == first  # the pin wins: it logs and waits
    assert any("is pinned: waiting" in r.getMessage() for r in caplog.records)

    registry.unpin()
    train(tiny_trainer, events(16, seed=4))
    replaced = publisher.maybe_publish({}, force=True)
    gate = registry.meta(replaced or 0)["gate"]
    assert gate["decision"] == "promoted" and "cannot be loaded" in gate["reason"]
    assert registry.serving().version == replaced


def test_holdout_fraction_zero_turns_the_gate_off_with_a_warning(
    tiny_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tiny_settings.evaluation.holdout_fraction = 0.0
    tiny_settings.registry.publish_every_steps = 4
    stream = write_jsonl(tmp_path / "events.jsonl", keyword_events(320, LABELS, seed=5))
    with caplog.at_level(logging.WARNING, logger="dynft.publisher"):
        run(tiny_settings, stream)
    warnings = [r.getMessage() for r in caplog.records if "holdout_fraction = 0" in r.getMessage()]
    assert len(warnings) == 1 and "every finite candidate is promoted" in warnings[0]
    registry = AdapterRegistry(tiny_settings.registry_dir)
    versions = registry.versions()
    assert len(versions) >= 3  # more than the first: before, serving froze at v1
    decisions = [registry.meta(v)["gate"]["decision"] for v in versions]
    assert decisions == ["promoted"] * len(versions)
    assert registry.serving().version == versions[-1]


def test_a_pin_made_while_the_gate_judges_holds(
    tiny_settings: Settings, tiny_trainer: OnlineTrainer, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator pins the serving version between the gate's judgement and its promotion: the pin
    wins, and the version's metadata says why it does not serve."""
    registry = AdapterRegistry(tiny_settings.registry_dir)
    publisher = Publisher(registry, tiny_trainer, HoldoutWindow(64), tiny_settings, TrainerMetrics(CollectorRegistry()))
    train(tiny_trainer, events(32, seed=1))
    first = publisher.maybe_publish({}, force=True)
    assert first is not None and registry.serving().version == first
    train(tiny_trainer, events(16, seed=2))
    state, decision = publisher.candidate()
    promote = dataclasses.replace(decision, promote=True, reason="judged better")  # as a passing gate says
    registry.promote(first, "operator", pin=True)  # meanwhile, from `dynft adapters promote` or the admin API
    second = publisher.record(state, promote, {})
    assert registry.serving().version == first and registry.serving().pinned
    assert publisher.serving_version == first and second != first
    gate = registry.meta(second)["gate"]
    assert gate["decision"] == "rejected" and f"serving version {first} was pinned meanwhile" in gate["reason"]
    registry.unpin()
    assert registry.promote(second, "gate", unless_pinned=True) and registry.serving().version == second


class PinningRegistry(AdapterRegistry):
    """Pins the serving version while a version is being written: the narrowest race, made on purpose
    (no real operator can be timed into it)."""

    def publish(self, state: AdapterState, meta: dict[str, Any]) -> VersionInfo:
        info = super().publish(state, meta)
        serving = self.serving().version
        if serving is not None:  # the first version has nothing to pin against
            self.promote(serving, "operator", pin=True)
        return info


def test_a_pin_made_while_a_passing_version_is_written_holds(
    tiny_settings: Settings, tiny_trainer: OnlineTrainer, caplog: pytest.LogCaptureFixture
) -> None:
    registry = PinningRegistry(tiny_settings.registry_dir)
    publisher = Publisher(registry, tiny_trainer, HoldoutWindow(64), tiny_settings, TrainerMetrics(CollectorRegistry()))
    train(tiny_trainer, events(32, seed=1))
    first = publisher.maybe_publish({}, force=True)
    assert first is not None and not registry.serving().pinned
    train(tiny_trainer, events(16, seed=2))
    state, decision = publisher.candidate()
    with caplog.at_level(logging.WARNING, logger="dynft.publisher"):
        second = publisher.record(state, dataclasses.replace(decision, promote=True, reason="judged better"), {})
    assert registry.serving().version == first and registry.serving().pinned and second != first
    assert any("pinned the serving version meanwhile" in r.getMessage() for r in caplog.records)


def test_an_operator_s_promotion_shows_in_the_trainer_s_status_before_its_next_publish(
    tiny_settings: Settings, tiny_trainer: OnlineTrainer
) -> None:
    """Found by a probe: after an operator promoted an older version on an idle stream, the
    trainer's status line and the console said the newer one served until the next publish."""
    registry = AdapterRegistry(tiny_settings.registry_dir)
    publisher = Publisher(registry, tiny_trainer, HoldoutWindow(64), tiny_settings, TrainerMetrics(CollectorRegistry()))
    train(tiny_trainer, events(32, seed=1))
    first = publisher.maybe_publish({}, force=True)
    train(tiny_trainer, events(16, seed=2))
    second = publisher.maybe_publish({}, force=True)  # too few held-out events to judge it: rejected
    assert first is not None and second is not None and registry.serving().version == first
    assert publisher.serving_now() == publisher.serving_version == first
    registry.promote(second, "operator", pin=True)  # from the admin API, say, while the stream is idle
    assert publisher.serving_now() == second and publisher.serving_version == first  # the gate's view waits
    registry.pointer_path.write_text("{ damaged")
    assert publisher.serving_now() == first  # unreadable: the last one known, not an error


def test_a_named_task_s_gate_decisions_name_the_task_in_the_log(
    tiny_settings: Settings, tiny_trainer: OnlineTrainer, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by a probe: sixteen tasks' "version 5 rejected: only 4 held-out events" lines could not
    be told apart."""
    registry = AdapterRegistry(tiny_settings.registry_dir / "tasks" / "intents")
    metrics = TrainerMetrics(CollectorRegistry())
    publisher = Publisher(registry, tiny_trainer, HoldoutWindow(64), tiny_settings, metrics, task="intents")
    train(tiny_trainer, events(32, seed=1))
    with caplog.at_level(logging.INFO, logger="dynft.publisher"):
        version = publisher.maybe_publish({}, force=True)
    said = [r.getMessage() for r in caplog.records]
    assert version is not None and f"task intents: version {version} promoted" in " ".join(said), said
    default = Publisher(
        AdapterRegistry(tiny_settings.registry_dir), tiny_trainer, HoldoutWindow(64), tiny_settings, metrics
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dynft.publisher"):
        version = default.maybe_publish({}, force=True)
    assert any(r.getMessage().startswith(f"version {version} promoted") for r in caplog.records)
