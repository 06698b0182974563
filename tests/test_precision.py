"""``model.autocast``: the trainer, the gate and the server compute in the same precision (bf16 on a
CPU where asked, as on a GPU); the adapter and optimizer stay fp32."""

from __future__ import annotations

import time

import pytest
import torch
from prometheus_client import CollectorRegistry

from dynft.errors import ConfigError
from dynft.events import Event
from dynft.metrics import ServerMetrics
from dynft.precision import autocast_dtype, cpu_has_native_bf16
from dynft.registry import AdapterRegistry
from dynft.serving.engine import InferenceEngine
from dynft.settings import Settings
from dynft.trainer import OnlineTrainer, build_trainer

from helpers import keyword_events

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_the_compute_dtype_follows_the_setting_the_device_and_the_weights() -> None:
    assert autocast_dtype("on", CPU, torch.float32) == torch.bfloat16
    assert autocast_dtype("off", CPU, torch.float32) is None
    assert autocast_dtype("auto", CPU, torch.float32) == (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert autocast_dtype("auto", CUDA, torch.bfloat16) == torch.bfloat16
    assert autocast_dtype("auto", CUDA, torch.float16) == torch.float16  # fp16 weights compute in fp16
    with pytest.raises(ConfigError, match=r"model\.autocast = off needs fp32 base weights"):
        autocast_dtype("off", CUDA, torch.bfloat16)


def learning_curve(settings: Settings, stream: list[Event]) -> tuple[OnlineTrainer, list[bool], set[torch.dtype]]:
    """Train test-then-train on ``stream`` in steps of 16; each event's prediction before its step."""
    torch.manual_seed(0)
    trainer = build_trainer(settings.model, settings.adapter, settings.trainer)
    seen: set[torch.dtype] = set()
    query = next(m for name, m in trainer.model.named_modules() if name.endswith("query.base_layer"))
    hook = query.register_forward_hook(lambda module, args, out: seen.add(out.dtype))
    correct: list[bool] = []
    for i in range(0, len(stream), 16):
        result = trainer.step(trainer.collator(stream[i : i + 16], n_fresh=16))
        correct += [p == e.label for p, e in zip(result.predictions, stream[i : i + 16], strict=True)]
    hook.remove()
    return trainer, correct, seen


def test_a_bf16_trainer_learns_as_an_fp32_one_and_the_server_answers_as_its_gate_predicted(
    tiny_settings: Settings,
) -> None:
    stream = [Event(**r) for r in keyword_events(1600, ["alpha", "beta", "gamma"], seed=3)]  # type: ignore[arg-type]
    _, fp32, seen32 = learning_curve(tiny_settings, stream)
    tiny_settings.model.autocast = "on"
    trainer, bf16, seen16 = learning_curve(tiny_settings, stream)
    assert trainer.compute_dtype == torch.bfloat16
    # bf16 lengths in buckets of 16 (oneDNN keeps kernels per shape); fp32 pads to the longest
    assert trainer.collator.pad_multiple == 16 and trainer.collator(stream[:5], 5).input_ids.shape[1] % 16 == 0
    assert (seen32, seen16) == ({torch.float32}, {torch.bfloat16})  # the base layers' products
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters() if p.requires_grad)
    late32, late16 = sum(fp32[-320:]) / 320, sum(bf16[-320:]) / 320  # the last 20 steps, test-then-train
    assert late16 > 0.55 and abs(late16 - late32) < 0.1, (late16, late32)  # chance is 1/3

    probe = [Event(**r) for r in keyword_events(64, ["alpha", "beta", "gamma"], seed=4, prefix="p")]  # type: ignore[arg-type]
    expected = trainer.predictions(probe)  # what the gate scores
    registry = AdapterRegistry(tiny_settings.registry_dir)
    registry.promote(registry.publish(trainer.export(), {}).version, reason="test")
    engine = InferenceEngine(tiny_settings, registry, ServerMetrics(CollectorRegistry()))
    assert engine.compute_dtype == torch.bfloat16 and engine.pad_multiple == 16  # the gate's shapes
    engine.start()
    try:
        deadline = time.monotonic() + 30
        while not engine.ready and time.monotonic() < deadline:
            time.sleep(0.01)
        answer = engine.submit([e.text for e in probe]).result(timeout=30)
    finally:
        engine.stop()
    assert [p.label for p in answer.predictions] == expected
