from __future__ import annotations

import pytest
import torch

from dynft.errors import AdapterMismatchError, ModelError
from dynft.events import Event
from dynft.model import (
    AdapterSlots,
    AdapterState,
    build_model,
    grow_head,
    head_linear,
    load_tokenizer,
    peft_config_from_dict,
    peft_config_from_settings,
    resolve_model_path,
    structure_key,
)
from dynft.settings import AdapterSettings, ModelSettings
from dynft.trainer import OnlineTrainer

from helpers import keyword_events


def logits(trainer: OnlineTrainer, texts: list[str]) -> torch.Tensor:
    enc = trainer.collator.encode(texts)
    trainer.model.eval()
    with torch.no_grad():
        return trainer.model(**enc).logits


def train_a_little(trainer: OnlineTrainer, labels: list[str], n: int = 64, seed: int = 0) -> None:
    events = [Event(**r) for r in keyword_events(n, labels, seed=seed)]
    for i in range(0, n, 16):
        trainer.step(trainer.collator(events[i : i + 16], n_fresh=16))


def test_the_packaged_model_is_found_offline() -> None:
    path = resolve_model_path(None)
    assert (path / "model.safetensors").is_file()
    assert load_tokenizer(path)("hello world")["input_ids"][0] == 101  # [CLS]


def test_missing_model_directory_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ModelError, match=r"no config\.json"):
        resolve_model_path(str(tmp_path))


def test_growing_the_head_keeps_learned_rows(tiny_trainer: OnlineTrainer) -> None:
    train_a_little(tiny_trainer, ["alpha", "beta"])
    texts = ["w1 alpha1 w2", "beta2 w3 w4"]
    before = logits(tiny_trainer, texts)
    head = head_linear(tiny_trainer.model)
    weight_param = head.weight
    state_before = tiny_trainer.optimizer.state[weight_param]["exp_avg"].clone()
    grow_head(tiny_trainer.model, 5, tiny_trainer.optimizer)
    after = logits(tiny_trainer, texts)
    assert after.shape == (2, 5)
    torch.testing.assert_close(after[:, :2], before)
    assert head.weight is weight_param  # the optimizer still owns the same parameter
    moments = tiny_trainer.optimizer.state[weight_param]["exp_avg"]
    assert moments.shape == (5, head.in_features)
    torch.testing.assert_close(moments[:2], state_before)
    assert bool((moments[2:] == 0).all())
    train_a_little(tiny_trainer, ["alpha", "beta", "gamma", "delta", "omega"], seed=1)  # trains with 5 rows


def test_export_check_install_round_trip(tiny_trainer: OnlineTrainer, tiny_settings) -> None:  # type: ignore[no-untyped-def]
    train_a_little(tiny_trainer, ["alpha", "beta", "gamma"])
    state = tiny_trainer.export()
    assert state.labels == ["alpha", "beta", "gamma"] or sorted(state.labels) == ["alpha", "beta", "gamma"]
    texts = ["w1 alpha1 w2", "gamma0 w5", "beta3"]
    expected = logits(tiny_trainer, texts)

    # A fresh model of the same shape, as the server builds one from the version's config.
    path = tiny_trainer.base_model_path
    assert path is not None
    tokenizer = tiny_trainer.collator.tokenizer
    model = build_model(path, peft_config_from_dict(state.peft_config), 1, torch.device("cpu"), tokenizer.pad_token_id)
    slots = AdapterSlots(model)
    assert structure_key(slots.peft_config) == structure_key(state.peft_config)
    slots.install(slots.prepare(state))
    model.eval()
    with torch.no_grad():
        got = model(**tiny_trainer.collator.encode(texts)).logits
    torch.testing.assert_close(got, expected)


def test_check_refuses_bad_states_without_touching_the_model(tiny_trainer: OnlineTrainer) -> None:
    train_a_little(tiny_trainer, ["alpha", "beta"])
    good = tiny_trainer.export()
    live = {k: p.detach().clone() for k, p in tiny_trainer.slots.capture().items()}
    key = next(k for k in good.tensors if k not in tiny_trainer.slots.head_keys)

    def variant(**changes: object) -> AdapterState:
        tensors = dict(good.tensors)
        tensors.update(changes.pop("tensors", {}))  # type: ignore[arg-type]
        return AdapterState(
            tensors, list(changes.pop("labels", good.labels)), dict(changes.pop("config", good.peft_config))
        )  # type: ignore[arg-type]

    nan = good.tensors[key].clone()
    nan.view(-1)[0] = float("nan")
    bad = {
        "non-finite": variant(tensors={key: nan}),
        "shape": variant(tensors={key: good.tensors[key][:1]}),
        "labels": variant(labels=["alpha", "beta", "gamma"]),
        "config": variant(config={**good.peft_config, "r": 99}),
        "keys": AdapterState({k: v for k, v in good.tensors.items() if k != key}, good.labels, good.peft_config),
        "dtype": variant(tensors={key: good.tensors[key].to(torch.int64)}),
    }
    for name, state in bad.items():
        with pytest.raises(AdapterMismatchError):
            tiny_trainer.slots.prepare(state)
        for k, p in tiny_trainer.slots.capture().items():
            assert torch.equal(p.detach(), live[k]), f"{name}: the model changed"


@pytest.mark.parametrize(
    "adapter",
    [
        AdapterSettings(method="lora", use_dora=True),
        AdapterSettings(method="lora", use_rslora=True, r=4),
        AdapterSettings(method="ia3"),
        AdapterSettings(method="prompt", num_virtual_tokens=4),
    ],
    ids=["dora", "rslora", "ia3", "prompt"],
)
def test_other_peft_methods_train_export_and_reload(tiny_settings, adapter: AdapterSettings) -> None:  # type: ignore[no-untyped-def]
    from dynft.trainer import build_trainer

    trainer = build_trainer(tiny_settings.model, adapter, tiny_settings.trainer)
    train_a_little(trainer, ["alpha", "beta"])
    state = trainer.export()
    texts = ["alpha1 w1", "beta0 w2"]
    expected = logits(trainer, texts)
    other = build_trainer(tiny_settings.model, adapter, tiny_settings.trainer)
    assert structure_key(other.slots.peft_config) == structure_key(state.peft_config)
    other.load(state)
    torch.testing.assert_close(logits(other, texts), expected)
    assert peft_config_from_settings(adapter).peft_type.value == state.peft_config["peft_type"]


def test_prefix_tuning_fails_at_start_with_a_clear_error_where_the_model_cannot_take_it(tiny_settings) -> None:  # type: ignore[no-untyped-def]
    """transformers 5 renamed past_key_values to cache; peft 0.21 prefix tuning cannot inject into it."""
    from dynft.trainer import build_trainer

    with pytest.raises(ModelError, match=r"prefix tuning cannot run on .*choose adapter\.method = prompt"):
        build_trainer(tiny_settings.model, AdapterSettings(method="prefix"), tiny_settings.trainer)


@pytest.mark.parametrize("setting, same", [(0.0, True), (None, False)])
def test_attention_dropout_follows_the_setting(tiny_trainer: OnlineTrainer, setting: float | None, same: bool) -> None:
    """0 turns it off (torch's fused CPU attention refuses dropout); null, the default, keeps the model's own 0.1."""
    path = tiny_trainer.base_model_path
    assert path is not None
    lora = peft_config_from_dict(tiny_trainer.export().peft_config)
    options = ModelSettings(attention_dropout=setting)
    pad = tiny_trainer.collator.tokenizer.pad_token_id
    model = build_model(path, lora, 2, torch.device("cpu"), pad, "cls", options)
    attention = [m for name, m in model.named_modules() if name.endswith("attention.self.dropout")]
    assert attention and all(isinstance(m, torch.nn.Dropout) for m in attention)
    for name, module in model.named_modules():  # every other dropout off: only the attention's can differ
        if isinstance(module, torch.nn.Dropout) and not name.endswith("attention.self.dropout"):
            module.p = 0.0
    model.train()
    batch = tiny_trainer.collator.encode(["w1 alpha1 w2 w3 w4 w5", "beta3 w6"])
    torch.manual_seed(0)
    first = model(**batch).logits
    second = model(**batch).logits
    assert torch.equal(first, second) is same
