"""Model families: tiny random-initialised decoders train, publish, hot-swap and serve what the trainer computes.

Each family's model is built from a config (no downloads) with a word-level tokenizer that has
an eos token but no pad token, as decoder checkpoints usually ship.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from dynft.errors import ModelError
from dynft.events import Event
from dynft.families import LORA_TARGETS, family_of
from dynft.registry import AdapterRegistry
from dynft.settings import Settings, load_settings
from dynft.trainer import OnlineTrainer, build_trainer

from helpers import KEYWORDS, WORDS, keyword_events
from serving.conftest import PROBE, running_server, wait_for_version

EMPTY_TEXT = "\u200b\u00e9"  # a zero-width space and a letter Qwen2's byte-level vocabulary lacks: no tokens
PADDED_COMPANY = "w1 w2 w3 w4 w5 w6 w7 w8 alpha1 w9 w10 w11"  # longer than PROBE: PROBE gets padded beside it


def _save_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Single characters too: transformers maps qwen2 to its byte-level BPE tokenizer whatever the
    # saved class, and that one spells each word out (Ġ marks a space) from this vocabulary.
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789Ġ"))
    vocab = ["<unk>", "</s>", *WORDS, *(k for ks in KEYWORDS.values() for k in ks), *chars]
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>").save_pretrained(directory)


def _decoder_config(family: str) -> Any:
    import transformers as t

    small: dict[str, Any] = {"vocab_size": 128, "num_labels": 2, "eos_token_id": 1, "bos_token_id": 1}
    llama_like = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
    if family == "gpt2":
        return t.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **small)
    if family == "llama":
        return t.LlamaConfig(**llama_like, **small)
    if family == "qwen2":
        return t.Qwen2Config(**llama_like, **small)
    if family == "mistral":
        return t.MistralConfig(**llama_like, **small)
    if family == "distilbert":  # an encoder whose head has two saved layers (pre_classifier, classifier)
        return t.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64, **small)
    if family == "phi":
        return t.PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **small)
    raise ValueError(family)


def build_tiny_decoder(directory: Path, family: str) -> Path:
    """A random-initialised ``family`` sequence classifier, saved with its tokenizer."""
    from transformers import AutoModelForSequenceClassification

    directory.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(directory)
    torch.manual_seed(0)
    config = _decoder_config(family)
    config.pad_token_id = None  # dynft must set it (to eos) itself
    AutoModelForSequenceClassification.from_config(config).save_pretrained(directory)
    return directory


def build_tiny_bart(directory: Path) -> Path:
    from transformers import BartConfig, BartForSequenceClassification

    directory.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(directory)
    config = BartConfig(
        vocab_size=128,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    BartForSequenceClassification(config).save_pretrained(directory)
    return directory


def _settings(model_dir: Path, tmp_path: Path, pooling: str = "auto") -> Settings:
    return load_settings(
        overrides={
            "state_dir": str(tmp_path / "state"),
            "model.path": str(model_dir),
            "model.max_length": 32,
            "model.pooling": pooling,
            "trainer.lr": 1e-2,
            "trainer.head_lr": 3e-2,
            "trainer.warmup_steps": 5,
            "trainer.threads": 1,
            # The families' forward passes are compared, adapter to adapter: the served blend with
            # word counts is the same for every family (tests/serving/test_lexical_serving.py).
            "trainer.lexical_blend": False,
        }
    )


def _train(trainer: OnlineTrainer, labels: list[str], n: int, seed: int) -> None:
    stream = [Event(**r) for r in keyword_events(n, labels, seed=seed)]
    for i in range(0, len(stream), 16):
        trainer.step(trainer.collator(stream[i : i + 16], n_fresh=16))


def _trainer_scores(trainer: OnlineTrainer, text: str) -> dict[str, float]:
    labels = trainer.exported_labels()
    trainer.model.eval()
    try:
        with torch.no_grad():
            logits = trainer.model(**trainer.collator.encode([text])).logits[0, : len(labels)]
    finally:
        trainer.model.train()
    return dict(zip(labels, torch.softmax(logits.float(), dim=-1).tolist(), strict=True))


def _served_scores(base: str, texts: list[str], probe: str = PROBE) -> tuple[int, dict[str, float]]:
    r = httpx.post(f"{base}/v1/predict", json={"texts": texts}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    return body["adapter_version"], body["predictions"][texts.index(probe)]["scores"]


CASES = [("gpt2", "auto"), ("llama", "auto"), ("qwen2", "auto"), ("mistral", "auto"), ("phi", "auto")]
CASES.append(("qwen2", "mean"))
CASES.append(("distilbert", "auto"))  # a review: its head never grew (pre_classifier was taken for it)


@pytest.mark.parametrize("family,pooling", CASES, ids=[f"{f}-{p}" for f, p in CASES])
def test_decoder_trains_publishes_and_serves_what_the_trainer_computes(
    family: str, pooling: str, tmp_path: Path
) -> None:
    settings = _settings(build_tiny_decoder(tmp_path / family, family), tmp_path, pooling)
    trainer = build_trainer(settings.model, settings.adapter, settings.trainer)
    peft_config = trainer.model.peft_config["default"]
    assert sorted(peft_config.target_modules) == sorted(LORA_TARGETS[family])  # type: ignore[attr-defined]
    pad = trainer.collator.tokenizer.pad_token_id  # eos where the tokenizer had no pad token
    assert pad is not None and trainer.model.config.pad_token_id == pad

    registry = AdapterRegistry(settings.registry_dir, keep_last=10)
    expected: dict[int, dict[str, float]] = {}
    expected_empty: dict[int, dict[str, float]] = {}  # a text of no tokens (Qwen2's tokenizer has some)
    for version, labels in ((1, ["alpha", "beta"]), (2, ["alpha", "beta", "gamma"])):  # the head grows for v2
        _train(trainer, labels, 96, seed=version)
        assert registry.publish(trainer.export(), {"step": trainer.steps}).version == version
        expected[version] = _trainer_scores(trainer, PROBE)
        expected_empty[version] = _trainer_scores(trainer, EMPTY_TEXT)
    assert expected[1].keys() != expected[2].keys()
    assert max(abs(expected[1][k] - expected[2][k]) for k in expected[1]) > 1e-3

    registry.promote(1, "test")
    with running_server(settings) as (base, _server):
        wait_for_version(base, 1)
        for version in (1, 2, 1):  # swap in, swap on, swap back
            registry.promote(version, "test")
            wait_for_version(base, version)
            for texts in ([PROBE], [PROBE, PADDED_COMPANY], [PADDED_COMPANY, PROBE]):
                served_version, scores = _served_scores(base, texts)
                assert served_version == version
                assert scores.keys() == expected[version].keys()
                worst = max(abs(scores[k] - expected[version][k]) for k in scores)
                assert worst < 1e-4, f"{family} v{version} {texts}: served differs from the trainer by {worst}"
            served_version, scores = _served_scores(base, [EMPTY_TEXT], EMPTY_TEXT)
            worst = max(abs(scores[k] - expected_empty[version][k]) for k in scores)
            assert served_version == version and worst < 1e-4, f"{family} v{version}: empty text differs by {worst}"


def test_families_are_read_from_the_config(tmp_path: Path) -> None:
    assert family_of(build_tiny_decoder(tmp_path / "gpt2", "gpt2")).kind == "decoder"
    assert family_of(build_tiny_bart(tmp_path / "bart")).kind == "encoder-decoder"


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bart(tmp_path_factory.mktemp("bart") / "model")


def test_an_encoder_decoder_model_is_refused_before_loading(bart_dir: Path, tmp_path: Path) -> None:
    settings = _settings(bart_dir, tmp_path)
    with pytest.raises(ModelError, match="bart is an encoder-decoder model"):
        build_trainer(settings.model, settings.adapter, settings.trainer)


def test_dynft_run_refuses_an_encoder_decoder_model_with_exit_2(bart_dir: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "dynft", "run", "--model", str(bart_dir), "--state-dir", str(tmp_path / "s")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)  # start-up under a loaded CI
    assert result.returncode == 2, result.stderr
    assert "encoder-decoder model" in result.stderr


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"quantization": "4bit", "device": "cpu"}, "needs a CUDA device"),
        ({"dtype": "fp16", "device": "cpu"}, "needs a CUDA device"),
    ],
)
def test_gpu_only_options_are_refused_on_cpu(
    overrides: dict[str, str], message: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = _settings(tiny_model_dir, tmp_path)
    model = settings.model.model_copy(update=overrides)
    with pytest.raises(ModelError, match=message):
        build_trainer(model, settings.adapter, settings.trainer)


def test_cuda_n_is_a_valid_device_setting_and_nonsense_is_not(tmp_path: Path) -> None:
    from dynft.errors import ConfigError

    assert load_settings(overrides={"model.device": "cuda:1"}).model.device == "cuda:1"
    with pytest.raises(ConfigError, match=r"model\.device"):
        load_settings(overrides={"model.device": "gpu"})


def test_gradient_checkpointing_trains_to_the_same_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    results = []
    for checkpointing in (False, True):
        settings = _settings(tiny_model_dir, tmp_path)
        model = settings.model.model_copy(update={"gradient_checkpointing": checkpointing})
        trainer = build_trainer(model, settings.adapter, settings.trainer.model_copy(update={"seed": 3}))
        assert trainer.model.base_model.model.is_gradient_checkpointing == checkpointing
        _train(trainer, ["alpha", "beta"], 32, seed=5)
        results.append(trainer.export().tensors)
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-4, atol=1e-5)


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("overrides", [{"dtype": "fp16"}, {"quantization": "4bit"}, {"quantization": "8bit"}])
def test_gpu_precisions_train_a_decoder_and_export_finite_adapters(overrides: dict[str, str], tmp_path: Path) -> None:
    if "quantization" in overrides and not _has_bitsandbytes():
        pytest.skip("needs bitsandbytes")
    settings = _settings(build_tiny_decoder(tmp_path / "llama", "llama"), tmp_path)
    model = settings.model.model_copy(update={"device": "cuda", **overrides})
    trainer = build_trainer(model, settings.adapter, settings.trainer)
    before = {k: t.clone() for k, t in trainer.export().tensors.items()}
    _train(trainer, ["alpha", "beta"], 64, seed=1)
    after = trainer.export().tensors
    assert trainer.steps > 0
    assert all(bool(torch.isfinite(t).all()) for t in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].shape == after[k].shape)


def test_a_text_that_tokenizes_to_nothing_trains_and_predicts_like_any_other(tmp_path: Path) -> None:
    family = "qwen2"  # its byte-level tokenizer drops what its vocabulary lacks (the others map it to unk)
    settings = _settings(build_tiny_decoder(tmp_path / family, family), tmp_path)
    trainer = build_trainer(settings.model, settings.adapter, settings.trainer)
    tokenizer = trainer.collator.tokenizer
    assert tokenizer(EMPTY_TEXT)["input_ids"] == []  # the case itself: the tokenizer yields nothing

    alone = trainer.collator.encode([EMPTY_TEXT])
    assert alone["attention_mask"].tolist() == [[1]]  # one token that stands for the empty text
    assert alone["input_ids"][0, 0] != tokenizer.pad_token_id  # one the decoder's head does not skip as padding

    # A batch of nothing but such texts trains (it failed to reshape (B, 0) before) ...
    empty_only = [Event(id=f"z{i}", text=EMPTY_TEXT, label=label) for i, label in enumerate(["alpha", "beta"])]
    result = trainer.step(trainer.collator(empty_only, n_fresh=2))
    assert not result.skipped and trainer.steps == 1
    assert result.predictions == [None, None]  # no label was known before this first step
    again = trainer.step(trainer.collator(empty_only, n_fresh=2))
    assert set(again.predictions) <= {"alpha", "beta"} and trainer.steps == 2
    # ... and the empty text is answered the same alone and padded beside a longer text.
    _train(trainer, ["alpha", "beta"], 32, seed=1)
    mixed = [Event(id="m", text=PADDED_COMPANY, label="alpha"), Event(id="e", text=EMPTY_TEXT, label="beta")]
    assert (
        trainer.predict(mixed, trainer.exported_labels())[1] == trainer.predict(mixed[1:], trainer.exported_labels())[0]
    )
    trainer.model.eval()
    with torch.no_grad():
        logits = [
            trainer.model(**trainer.collator.encode(texts)).logits
            for texts in ([EMPTY_TEXT], [PADDED_COMPANY, EMPTY_TEXT])
        ]
    torch.testing.assert_close(logits[0][0], logits[1][1], rtol=1e-4, atol=1e-5)


def test_imprinting_on_a_decoder_reads_the_last_token_as_its_head_does(tmp_path: Path) -> None:
    # Every text starts with the same word and ends with its label's keyword: a causal model's first
    # position sees only the shared word, its last one the keyword. Imprinted from the position the
    # head reads, the new rows tell the labels apart before any training.
    settings = _settings(build_tiny_decoder(tmp_path / "llama", "llama"), tmp_path, "cls")
    quiet = {"imprint_new_labels": "on", "lr": 1e-9, "head_lr": 1e-9, "warmup_steps": 1000}
    trainer = build_trainer(settings.model, settings.adapter, settings.trainer.model_copy(update=quiet))
    assert trainer.pooling == "cls"

    def texts(label: str, n: int, seed: int) -> list[Event]:
        rng = random.Random(seed)
        return [
            Event(
                id=f"{label}{seed}-{i}",
                text=" ".join(["w1", *rng.sample(WORDS, rng.randrange(1, 4)), KEYWORDS[label][i % 4]]),
                label=label,
            )
            for i in range(n)
        ]

    first = texts("alpha", 8, 0) + texts("beta", 8, 0)
    trainer.step(trainer.collator(first, n_fresh=len(first)))
    probes = texts("alpha", 20, 1) + texts("beta", 20, 1)
    predicted = trainer.predict(probes, trainer.exported_labels())
    hits = sum(p == e.label for p, e in zip(predicted, probes, strict=True))
    assert hits >= 36, f"{hits} of 40 right after imprinting"  # position 0 holds the same features for all: 20
