"""A server whose serving version cannot be loaded still serves: the newest loadable version of the
pointer's history, with a warning and ``dynft_serving_fallback`` at 1, and answers computed by that
version (compared with a separate model, as the hot-swap test does)."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

from dynft.events import Event
from dynft.model import AdapterState
from dynft.registry import AdapterRegistry
from dynft.settings import Settings
from dynft.trainer import OnlineTrainer

from helpers import keyword_events
from serving.conftest import PROBE, perturbed, reference_outputs, running_server, wait_for_version


def publish_three(trainer: OnlineTrainer, registry: AdapterRegistry) -> dict[int, AdapterState]:
    stream = [Event(**r) for r in keyword_events(96, ["alpha", "beta"], seed=3)]  # type: ignore[arg-type]
    for i in range(0, len(stream), 16):
        trainer.step(trainer.collator(stream[i : i + 16], n_fresh=16))
    trained = trainer.export()
    out = {}
    for k in (1, 2, 3):
        out[k] = perturbed(trained, k, trainer.slots.head_keys)
        assert registry.publish(out[k], {"step": k}).version == k
    return out


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def probe_scores(base: str) -> tuple[int, dict[str, float]]:
    r = httpx.post(f"{base}/v1/predict", json={"texts": [PROBE]})
    assert r.status_code == 200, r.text
    return r.json()["adapter_version"], r.json()["predictions"][0]["scores"]


def test_an_unloadable_serving_version_falls_back_to_the_newest_loadable_one(
    tiny_settings: Settings, tiny_trainer: OnlineTrainer, caplog: pytest.LogCaptureFixture
) -> None:
    registry = AdapterRegistry(tiny_settings.registry_dir)
    states = publish_three(tiny_trainer, registry)
    expected = reference_outputs(tiny_settings, states, PROBE)
    registry.promote(1, "first")
    registry.promote(2, "second")  # history: [1]
    corrupt(registry.path(2) / "adapter_model.safetensors")  # the disk lied after the promotion

    with (
        caplog.at_level(logging.WARNING, logger="dynft.serving.engine"),
        running_server(tiny_settings) as (
            base,
            server,
        ),
    ):
        wait_for_version(base, 1)
        version, scores = probe_scores(base)
        assert version == 1
        assert max(abs(scores[k] - v) for k, v in expected[1].items()) < 1e-4  # version 1's answers
        metrics = server.metrics_registry
        assert metrics.get_sample_value("dynft_serving_fallback") == 1
        adapters = httpx.get(f"{base}/v1/adapters").json()
        assert (adapters["serving"], adapters["loaded"]) == (2, 1)
        assert [r.getMessage() for r in caplog.records if "instead" in r.getMessage()] == [
            "serving version 2 cannot be loaded; answering with version 1 instead"
        ]

        registry.promote(3, "third")  # a loadable serving version ends the fallback
        wait_for_version(base, 3)
        version, scores = probe_scores(base)
        assert max(abs(scores[k] - v) for k, v in expected[3].items()) < 1e-4
        assert metrics.get_sample_value("dynft_serving_fallback") == 0
