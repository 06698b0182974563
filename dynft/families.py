"""Model families: what dynft needs to know about an architecture before it loads one.

A Hugging Face model directory names its architecture in ``config.json`` (``model_type``).
From it dynft decides, on purpose rather than by accident:

- the *kind*: an encoder (BERT, MPNet, RoBERTa), a decoder-only model (GPT-2, Llama, Qwen2,
  Mistral, Phi, Gemma) or an encoder-decoder (BART, T5). Encoders and decoders load as
  ``AutoModelForSequenceClassification`` and train alike: an encoder's head reads the first
  token (or its pooler), a decoder's head (``score``) the last non-pad token. Encoder-decoder
  heads need an ``eos`` in every text and pool the decoder's last ``eos``; dynft refuses them
  at start-up instead of training something that silently reads the wrong token.
- the LoRA target modules, when ``adapter.target_modules`` is not set: the attention query and
  value projections of each family (peft's own table has gaps, MPNet for one).

Also here: the precision, device and quantisation choices of ``model.*``, and the start-up
line that says how big the model and its adapter are.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from dynft.errors import ModelError

log = logging.getLogger(__name__)
Kind = Literal["encoder", "decoder", "encoder-decoder"]

# Query and value projections: LoRA on these two is the usual, cheap default (Hu et al. 2021).
LORA_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "albert": ["query", "value"],
    "mpnet": ["q", "v"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    "gpt2": ["c_attn"],  # GPT-2 computes q, k and v in one Conv1D
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
}

_DECODERS = frozenset(
    {"gpt2", "gpt_neox", "gptj", "falcon", "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2"}
    | {"phi", "phi3", "opt", "bloom", "mpt", "gpt_neo", "stablelm", "starcoder2", "olmo"}
)


# Families whose position ids start after the pad token's id (padding_idx + 1), as RoBERTa's do.
OFFSET_POSITIONS = frozenset(
    {
        "roberta",
        "roberta-prelayernorm",
        "xlm-roberta",
        "xlm-roberta-xl",
        "xmod",
        "camembert",
        "mpnet",
        "data2vec-text",
        "longformer",
        "ibert",
    }
)


# Where configurations keep the dropout on attention weights: BERT, RoBERTa, MPNet, DeBERTa,
# ELECTRA, ALBERT; DistilBERT, Llama, Qwen2, Mistral; GPT-2 (``model.attention_dropout``).
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")


@dataclass(frozen=True)
class Family:
    """What dynft knows about one model directory's architecture."""

    model_type: str
    kind: Kind
    attention_dropout_keys: tuple[str, ...] = ()  # those of ATTENTION_DROPOUT_KEYS its config.json has

    @property
    def lora_targets(self) -> list[str] | None:
        """Default LoRA target modules; ``None`` leaves the choice to peft."""
        targets = LORA_TARGETS.get(self.model_type)
        return list(targets) if targets is not None else None


def read_config(path: Path) -> dict[str, Any]:
    """The model's ``config.json``; ``ModelError`` when it cannot be read or is not an object."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"model directory {path}: cannot read config.json ({exc})") from exc
    if not isinstance(config, dict):
        raise ModelError(f"model directory {path}: config.json is not a JSON object")
    return config


def family_of(path: Path) -> Family:
    """The family of the model in ``path`` (read from its ``config.json``)."""
    config = read_config(path)
    model_type = str(config.get("model_type", ""))
    architectures = [str(a) for a in config.get("architectures") or []]
    kind: Kind = "encoder"
    if config.get("is_encoder_decoder"):
        kind = "encoder-decoder"
    elif model_type in _DECODERS or any(a.endswith("ForCausalLM") for a in architectures):
        kind = "decoder"
    return Family(model_type, kind, tuple(key for key in ATTENTION_DROPOUT_KEYS if key in config))


def token_limit(path: Path, wanted: int, virtual_tokens: int = 0, tell: bool = False) -> int:
    """``model.max_length``, or fewer where the model has fewer positions: a longer input indexes
    past its position embeddings (a crash at every step or request, not a refusal). Models whose
    positions start after the pad id (RoBERTa, MPNet) have that many fewer; prompt tuning's
    virtual tokens (``virtual_tokens``) take positions too. ``tell``: warn when it is fewer."""
    config = read_config(path)
    positions = config.get("max_position_embeddings", config.get("n_positions"))
    if not isinstance(positions, int) or isinstance(positions, bool) or positions <= 0:
        return wanted
    if str(config.get("model_type", "")) in OFFSET_POSITIONS:
        pad = config.get("pad_token_id")
        positions -= (pad if isinstance(pad, int) and not isinstance(pad, bool) else 1) + 1
    limit = positions - virtual_tokens
    if limit < 2:
        raise ModelError(
            f"model directory {path}: {positions} positions leave no room for a text "
            f"after {virtual_tokens} virtual tokens (adapter.num_virtual_tokens)"
        )
    if tell and limit < wanted:
        beside = f" beside {virtual_tokens} virtual ones" if virtual_tokens else ""
        log.warning(
            "model.max_length = %d, but %s reads %d tokens at most%s: texts are cut there", wanted, path, limit, beside
        )
    return min(wanted, limit)


def check_supported(family: Family, path: Path) -> None:
    """Refuse an encoder-decoder model at start-up, with what to use instead."""
    if family.kind == "encoder-decoder":
        raise ModelError(
            f"model directory {path}: {family.model_type} is an encoder-decoder model; dynft trains encoder "
            "(BERT, MPNet, RoBERTa) and decoder-only (GPT-2, Llama, Qwen2, Mistral, Phi, Gemma) sequence "
            "classifiers. Encoder-decoder heads pool the last eos token of every text, which dynft does "
            "not guarantee; use an encoder or decoder-only model"
        )


def pick_device(setting: str) -> torch.device:
    """``model.device``: auto, cpu, cuda or cuda:N, checked against the devices present."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"model.device is {setting} but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelError(f"model.device is {setting} but only {torch.cuda.device_count()} CUDA devices exist")
    return device


def base_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``model.dtype`` of the frozen base weights; auto: bf16 on a GPU with it, fp16 on one without, fp32 on CPU."""
    if setting == "fp32" or (setting == "auto" and device.type != "cuda"):
        return torch.float32
    if device.type != "cuda":
        raise ModelError(f"model.dtype = {setting} needs a CUDA device (model.device is {device}); use fp32 or auto")
    bf16 = torch.cuda.is_bf16_supported()
    if setting == "bf16" and not bf16:
        raise ModelError(f"model.dtype = bf16 but {torch.cuda.get_device_name(device)} has no bf16; use fp16 or auto")
    if setting == "fp16" or (setting == "auto" and not bf16):
        return torch.float16
    return torch.bfloat16


def check_quantization(setting: str, device: torch.device) -> None:
    """4- or 8-bit base weights (QLoRA) need a CUDA device and bitsandbytes; say so before loading."""
    if setting == "none":
        return
    if device.type != "cuda":
        raise ModelError(f"model.quantization = {setting} needs a CUDA device (model.device is {device})")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ModelError(
            f"model.quantization = {setting} needs the bitsandbytes package (pip install bitsandbytes)"
        ) from exc


def size_line(model: nn.Module, path: Path) -> str:
    """The start-up line: parameters, the trainable share, and the adapter's size on disk (fp32 safetensors)."""
    total = trainable = adapter_bytes = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
            adapter_bytes += param.numel() * 4  # versions are exported as fp32 copies
    share = 100.0 * trainable / max(1, total)
    return (
        f"model {path}: {total / 1e6:.1f}M parameters, {trainable / 1e6:.3f}M trainable ({share:.2f}%), "
        f"adapter about {adapter_bytes / 2**20:.2f} MiB on disk"
    )


def read_positions(features: torch.Tensor, input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """The (B, H) rows that a decoder's head picks from its per-position inputs ``features`` (B, T, H).

    A decoder's ``score`` scores every position and keeps the last token that is not the pad
    token (transformers' ``last_non_pad_token``: the rightmost one, whichever side pads), or the
    last position when the model has no pad token. Under ``model.pooling = mean`` every position
    holds the mean, so the same pick is right there too.
    """
    if pad_token_id is None:
        return features[:, -1]
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
    last = (positions * (input_ids != pad_token_id).int()).argmax(dim=-1)  # (B,)
    return features[torch.arange(features.shape[0], device=features.device), last.to(features.device)]
