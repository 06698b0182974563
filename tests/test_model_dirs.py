"""Model directories as users bring them (found by a probe of model families): what is refused at
start-up with a clear error (exit 2, never a restart loop), what is cut, what is told."""

from __future__ import annotations

import builtins
import json
import logging
import random
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from test_loop import run

from dynft.errors import ModelError, exit_code
from dynft.families import token_limit
from dynft.model import _load_base, load_tokenizer
from dynft.registry import AdapterRegistry
from dynft.settings import Settings
from dynft.trainer import build_trainer

from helpers import WORDS, build_tiny_model, keyword_events, write_jsonl
from serving.conftest import running_server, wait_for_version


def tiny(directory: Path, family: str = "bert", **config: Any) -> Path:
    """The tests' tiny BERT tokenizer beside a random ``family`` model with ``config``'s changes."""
    import transformers as t

    build_tiny_model(directory)
    size = json.loads((directory / "config.json").read_text())["vocab_size"]
    common: dict[str, Any] = {"vocab_size": size, "hidden_size": 32, "num_hidden_layers": 1, "num_labels": 2}
    common |= {"num_attention_heads": 2, "intermediate_size": 64, "pad_token_id": 0} | config
    configs = {"bert": t.BertConfig, "roberta": t.RobertaConfig}
    model = t.AutoModelForSequenceClassification.from_config(configs[family](**common))
    model.save_pretrained(str(directory))
    return directory


def test_texts_longer_than_the_models_positions_are_cut_there_by_trainer_and_server(
    tiny_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A BERT of 16 positions with model.max_length 64 crashed at every step on long texts (the
    trainer restarted for ever) and answered them 500; RoBERTa's and GPT-2's the same."""
    tiny_settings.model.path = str(tiny(tmp_path / "short", max_position_embeddings=16))
    tiny_settings.model.max_length = 64
    rng = random.Random(3)
    rows = [
        {**e, "text": e["text"] + " " + " ".join(rng.choices(WORDS, k=60))}
        for e in keyword_events(120, ["alpha", "beta"])
    ]
    with caplog.at_level(logging.WARNING):
        loop = run(tiny_settings, write_jsonl(tmp_path / "long.jsonl", rows))
    assert loop.trainer.collator.max_length == 16 and loop.trainer.steps > 0
    assert "model.max_length = 64, but" in caplog.text and "reads 16 tokens at most" in caplog.text
    registry = AdapterRegistry(tiny_settings.registry_dir)
    version = registry.versions()[-1]
    registry.promote(version, "test")
    with running_server(tiny_settings) as (base, _):
        wait_for_version(base, version)
        r = httpx.post(f"{base}/v1/predict", json={"texts": [rows[0]["text"], "w1"]}, timeout=30)
        assert r.status_code == 200, r.text


def test_the_limit_counts_offset_positions_and_prompt_tuning_tokens(tmp_path: Path) -> None:
    roberta = tiny(tmp_path / "roberta", "roberta", max_position_embeddings=20, pad_token_id=1)
    assert token_limit(roberta, 64) == 18  # positions start at pad id + 1
    bert = tiny(tmp_path / "bert", max_position_embeddings=64)
    assert token_limit(bert, 64) == 64 and token_limit(bert, 512, virtual_tokens=16) == 48
    with pytest.raises(ModelError, match="no room for a text after 64 virtual tokens"):
        token_limit(bert, 64, virtual_tokens=64)


def test_a_directory_with_custom_code_is_refused_without_running_or_asking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers asked "Do you wish to run the custom code? [y/N]" on standard input, which under
    `--source file:-` is the event stream: a line "y" ran the directory's Python."""
    directory = build_tiny_model(tmp_path / "custom")
    config = json.loads((directory / "config.json").read_text())
    config |= {"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "configuration_evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")

    def asked(*_: object) -> str:
        raise AssertionError("transformers asked whether to run the directory's code")

    monkeypatch.setattr(builtins, "input", asked)
    load_tokenizer(directory)  # its tokenizer is a known class: read without the directory's code
    with pytest.raises(ModelError) as err:
        _load_base(directory, 2, torch.float32, "none", torch.device("cpu"), {})
    assert exit_code(err.value) == 2 and not (tmp_path / "ran").exists()


def _model_settings(directory: Path) -> tuple[Any, Any, Any]:
    from dynft.settings import load_settings

    s = load_settings(overrides={"model.path": str(directory), "trainer.threads": 1})
    return s.model, s.adapter, s.trainer


@pytest.mark.parametrize("damage", ["config_list", "weights_cut", "bin_cut", "no_tokenizer", "tokenizer_past_vocab"])
def test_a_damaged_model_directory_is_a_clear_configuration_error(tmp_path: Path, damage: str) -> None:
    """Each was a traceback and exit 1, so `dynft run` restarted the trainer for ever (or, without
    tokenizer files, trained on five-token [UNK] inputs without a word)."""
    directory = build_tiny_model(tmp_path / damage)
    if damage == "config_list":
        (directory / "config.json").write_text("[1, 2]")
    elif damage == "weights_cut":
        weights = directory / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "bin_cut":  # weights in torch's own format, cut short
        from safetensors.torch import load_file

        weights = directory / "pytorch_model.bin"
        torch.save(load_file(str(directory / "model.safetensors")), weights)
        (directory / "model.safetensors").unlink()
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "no_tokenizer":
        for path in directory.iterdir():
            if path.name not in ("config.json", "model.safetensors"):
                path.unlink()
    else:  # a token added to the tokenizer, the embeddings not resized
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        tokenizer.add_special_tokens({"additional_special_tokens": ["[NEW]"]})
        tokenizer.save_pretrained(str(directory))
    with pytest.raises(ModelError) as err:
        build_trainer(*_model_settings(directory))
    assert exit_code(err.value) == 2 and str(directory) in str(err.value)


def test_base_weights_initialised_at_random_are_told(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """transformers re-initialised missing or reshaped base weights (all of a layer, the
    embeddings), and they stayed frozen at random: dynft said nothing."""
    from safetensors.torch import load_file, save_file

    directory = build_tiny_model(tmp_path / "holes")
    tensors = load_file(str(directory / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if ".layer.1." not in k}, str(directory / "model.safetensors"))
    with caplog.at_level(logging.WARNING):
        torch.manual_seed(0)
        build_trainer(*_model_settings(directory))
    assert "base weight(s) are missing from its files or of another shape" in caplog.text
    assert "bert.encoder.layer.1." in caplog.text and "classifier" not in caplog.text.split("frozen:")[1][:40]


def test_a_head_of_two_layers_and_a_bypassed_pooler_are_not_told(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A review: DistilBERT's pre_classifier is trained with its classifier (peft matches by suffix),
    and mean pooling bypasses BERT's pooler; neither is a frozen random weight."""
    import transformers as t

    directory = build_tiny_model(tmp_path / "distil")
    config = t.DistilBertConfig(
        vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=64
    )
    t.DistilBertModel(config).save_pretrained(str(directory))  # a base checkpoint: no head at all
    bert = build_tiny_model(tmp_path / "nopooler")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(bert / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if ".pooler." not in k}, str(bert / "model.safetensors"))
    with caplog.at_level(logging.WARNING):
        build_trainer(*_model_settings(directory))
        model, adapter, trainer = _model_settings(bert)
        model.pooling = "mean"
        build_trainer(model, adapter, trainer)
    assert "base weight(s) are missing" not in caplog.text
    model.pooling = "cls"
    with caplog.at_level(logging.WARNING):
        build_trainer(model, adapter, trainer)
    assert "base weight(s) are missing" in caplog.text and "pooler" in caplog.text
