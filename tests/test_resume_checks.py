"""Validate before mutating: ``load`` and ``restore`` either take all of a state or change nothing.

Each bad state is made from a real one by one change (a NaN, a wrong shape, a missing tensor, a
foreign optimizer state, another adapter rank, labels in another order); the trainer is then
compared with a copy of itself taken before the call, tensor by tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from dynft.errors import AdapterMismatchError
from dynft.events import Event
from dynft.model import AdapterState
from dynft.rank import convert_lora_rank
from dynft.settings import Settings
from dynft.trainer import OnlineTrainer, build_trainer

from helpers import keyword_events

LABELS = ["alpha", "beta", "gamma"]


def trained(settings: Settings, steps: int = 6, labels: list[str] = LABELS, seed: int = 0) -> OnlineTrainer:
    trainer = build_trainer(settings.model, settings.adapter, settings.trainer)
    stream = [Event(**r) for r in keyword_events(16 * steps, labels, seed=seed)]  # type: ignore[arg-type]
    for i in range(0, len(stream), 16):
        trainer.step(trainer.collator(stream[i : i + 16], n_fresh=16))
    return trainer


def fingerprint(trainer: OnlineTrainer) -> dict[str, Any]:
    """Everything load/restore may change, copied."""
    optim = {
        (i, name): value.clone()
        for i, values in trainer.optimizer.state_dict()["state"].items()
        for name, value in values.items()
    }
    return {
        "labels": trainer.label_map.labels,
        "params": {k: p.detach().clone() for k, p in trainer.slots.capture().items()},
        "optim": optim,
        "counters": (trainer.steps, trainer.skipped, trainer.lr_scale, trainer.imprinted),
        "head_rows": trainer.slots.head.out_features,
    }


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["labels"] == before["labels"]
    assert after["counters"] == before["counters"] and after["head_rows"] == before["head_rows"]
    assert after["params"].keys() == before["params"].keys()
    for key, tensor in before["params"].items():
        assert torch.equal(after["params"][key], tensor), key
    assert after["optim"].keys() == before["optim"].keys()
    for key, tensor in before["optim"].items():
        assert torch.equal(after["optim"][key], tensor), key


def with_nan(tensors: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    out[key] = tensors[key].clone()
    out[key].view(-1)[-1] = float("nan")  # the last element: a check that stops early would miss it
    return out


def last_lora_key(tensors: dict[str, torch.Tensor], prefix: str = "") -> str:
    return sorted(k for k in tensors if k.startswith(prefix) and "lora_B" in k)[-1]


RESTORE_FAULTS: dict[
    str, Callable[[dict[str, torch.Tensor], dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]]
] = {
    "nan_weight": lambda t, s: (with_nan(t, last_lora_key(t, "param.")), s),
    "wrong_shape": lambda t, s: ({**t, last_lora_key(t, "param."): torch.zeros(3, 3)}, s),
    "missing_tensor": lambda t, s: ({k: v for k, v in t.items() if k != last_lora_key(t, "param.")}, s),
    "integer_weight": lambda t, s: ({**t, last_lora_key(t, "param."): t[last_lora_key(t, "param.")].long()}, s),
    "foreign_optimizer_moment": lambda t, s: ({**t, "optim.0.exp_avg": torch.zeros(5)}, s),
    "optimizer_index_out_of_range": lambda t, s: ({**t, "optim.999.exp_avg": torch.zeros(1)}, s),
    "nan_optimizer_moment": lambda t, s: (with_nan(t, "optim.0.exp_avg_sq"), s),
    "bad_rng": lambda t, s: ({**t, "rng.torch": torch.zeros(3, dtype=torch.uint8)}, s),
    "duplicate_label": lambda t, s: (t, {**s, "labels": ["alpha", "alpha", "beta"]}),
    "missing_counter": lambda t, s: (t, {k: v for k, v in s.items() if k != "steps"}),
    "other_rank": lambda t, s: (t, {**s, "peft_config": {**s["peft_config"], "r": 4}}),
}


@pytest.mark.parametrize("fault", sorted(RESTORE_FAULTS))
def test_restore_of_a_bad_checkpoint_changes_nothing(tiny_settings: Settings, fault: str) -> None:
    source = trained(tiny_settings, seed=1)
    tensors, state = source.snapshot()
    tensors, state = RESTORE_FAULTS[fault](dict(tensors), dict(state))
    target = trained(tiny_settings, steps=2, labels=["alpha"], seed=2)  # a trainer with its own state
    before = fingerprint(target)
    with pytest.raises(AdapterMismatchError) as raised:
        target.restore(tensors, state)
    assert_same(before, fingerprint(target))
    if fault == "other_rank":
        assert "r 4 -> 8" in str(raised.value)  # the warning names what changed


def test_restore_of_a_good_checkpoint_takes_all_of_it(tiny_settings: Settings) -> None:
    source = trained(tiny_settings, seed=1)
    target = build_trainer(tiny_settings.model, tiny_settings.adapter, tiny_settings.trainer)
    target.restore(*source.snapshot())
    assert_same(fingerprint(source), fingerprint(target))


def test_a_label_map_one_batch_ahead_of_the_head_restores(tiny_settings: Settings) -> None:
    """The batching thread may add a label before the step that grows the head: a real checkpoint state."""
    source = trained(tiny_settings, labels=["alpha", "beta"], seed=3)
    source.label_map.ids(["gamma"])  # collated, not yet trained
    target = build_trainer(tiny_settings.model, tiny_settings.adapter, tiny_settings.trainer)
    target.restore(*source.snapshot())
    assert target.label_map.labels == ["alpha", "beta", "gamma"] and target.slots.head.out_features == 2
    assert target.imprinted == 2  # gamma's row is imprinted when its first batch comes


LOAD_FAULTS: dict[str, Callable[[AdapterState], AdapterState]] = {
    "nan_weight": lambda a: AdapterState(with_nan(a.tensors, last_lora_key(a.tensors)), a.labels, a.peft_config),
    "wrong_shape": lambda a: AdapterState(
        {**a.tensors, last_lora_key(a.tensors): torch.zeros(2, 2)}, a.labels, a.peft_config
    ),
    "other_config": lambda a: AdapterState(a.tensors, a.labels, {**a.peft_config, "r": 4}),
    "labels_reordered": lambda a: AdapterState(a.tensors, list(reversed(a.labels)), a.peft_config),
}


@pytest.mark.parametrize("fault", sorted(LOAD_FAULTS))
def test_load_of_a_bad_adapter_changes_nothing(tiny_settings: Settings, fault: str) -> None:
    adapter = LOAD_FAULTS[fault](trained(tiny_settings, seed=4).export())
    target = trained(tiny_settings, steps=2, labels=["alpha", "beta"], seed=5)
    before = fingerprint(target)
    with pytest.raises(AdapterMismatchError):
        target.load(adapter)
    assert_same(before, fingerprint(target))


def lora_product(state: AdapterState) -> dict[str, torch.Tensor]:
    r, alpha = state.peft_config["r"], state.peft_config["lora_alpha"]
    return {
        k: alpha / r * state.tensors[k.replace("lora_A", "lora_B")].double() @ t.double()
        for k, t in state.tensors.items()
        if "lora_A" in k
    }


def test_a_lora_adapter_carries_over_to_a_higher_rank_exactly(tiny_settings: Settings) -> None:
    low = tiny_settings.model_copy(update={"adapter": tiny_settings.adapter.model_copy(update={"r": 4})})
    adapter = trained(low, seed=6).export()
    target = build_trainer(tiny_settings.model, tiny_settings.adapter, tiny_settings.trainer)  # r = 8
    converted = convert_lora_rank(adapter, target.slots)
    target.load(converted)
    assert converted.peft_config["r"] == 8
    for key, delta in lora_product(adapter).items():
        assert torch.allclose(lora_product(converted)[key], delta, atol=1e-5), key
    probe = [Event(**r) for r in keyword_events(32, LABELS, seed=7)]  # type: ignore[arg-type]
    reference = build_trainer(low.model, low.adapter, low.trainer)
    reference.load(adapter)
    assert target.predictions(probe) == reference.predictions(probe)
    added = [t for k, t in converted.tensors.items() if "lora_B" in k]
    assert all(bool((b[:, 4:] == 0).all()) for b in added)  # the new directions start as LoRA's do: B = 0
