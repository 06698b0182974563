"""The base-model fingerprint covers the weights; versions recorded with the old scheme keep loading."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry
from safetensors.torch import load_file, save_file

from dynft.cli import main
from dynft.errors import BaseModelMismatchError
from dynft.events import Event
from dynft.fingerprint import SCHEME_PREFIX, BaseModelId, legacy_fingerprint, model_fingerprint
from dynft.metrics import ServerMetrics
from dynft.model import AdapterState
from dynft.registry import AdapterRegistry
from dynft.serving.engine import InferenceEngine
from dynft.settings import Settings
from dynft.trainer import OnlineTrainer

from helpers import keyword_events


def labelled(trainer: OnlineTrainer) -> AdapterState:
    """The trainer's adapter after one step (a fresh one has no labels to export)."""
    batch = [Event(**r) for r in keyword_events(16, ["alpha", "beta"])]  # type: ignore[arg-type]
    trainer.step(trainer.collator(batch, n_fresh=16))
    return trainer.export()


def test_changing_one_weight_changes_the_fingerprint(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    before = model_fingerprint(copy)
    assert before.startswith(SCHEME_PREFIX) and before == model_fingerprint(copy)  # stable
    weights = copy / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(k for k in tensors if k.endswith("value.weight"))[-1]
    tensors[name][-1, -1] += 1e-3  # one weight, the last one of a deep layer
    save_file(tensors, weights, metadata={"format": "pt"})
    assert model_fingerprint(copy) != before
    assert legacy_fingerprint(copy) == legacy_fingerprint(tiny_model_dir)  # what scheme 1 could not see
    assert model_fingerprint(copy, "mean") != model_fingerprint(copy, "cls")


def test_a_version_with_an_old_scheme_fingerprint_still_loads(
    tiny_settings: Settings, tiny_trainer: OnlineTrainer
) -> None:
    path = Path(str(tiny_settings.model.path))
    registry = AdapterRegistry(tiny_settings.registry_dir)
    state = labelled(tiny_trainer)
    legacy = registry.publish(state, {"base_model": legacy_fingerprint(path)}).version
    other = registry.publish(state, {"base_model": "0123456789abcdef"}).version  # old scheme, another model
    current = registry.publish(state, {"base_model": model_fingerprint(path)}).version
    engine = InferenceEngine(tiny_settings, registry, ServerMetrics(CollectorRegistry()))
    assert engine.load(legacy).version == legacy
    assert engine.load(current).version == current
    with pytest.raises(BaseModelMismatchError):
        engine.load(other)
    base = BaseModelId.of(path)
    registry.promote(legacy, "legacy", base_model=base)
    assert registry.serving().version == legacy


def test_cli_promote_refuses_a_version_of_another_base_model(
    tiny_settings: Settings, tiny_trainer: OnlineTrainer
) -> None:
    registry = AdapterRegistry(tiny_settings.registry_dir)
    state = labelled(tiny_trainer)
    good = registry.publish(state, {"base_model": model_fingerprint(Path(str(tiny_settings.model.path)))}).version
    foreign = registry.publish(state, {"base_model": SCHEME_PREFIX + "0123456789abcdef"}).version
    args = ["--state-dir", str(tiny_settings.state_dir), "--model", str(tiny_settings.model.path)]
    refused = CliRunner().invoke(main, ["adapters", "promote", str(foreign), *args])
    assert refused.exit_code == 1 and "another base model" in refused.output
    assert registry.serving().version is None
    accepted = CliRunner().invoke(main, ["adapters", "promote", str(good), *args])
    assert accepted.exit_code == 0, accepted.output
    assert registry.serving().version == good
