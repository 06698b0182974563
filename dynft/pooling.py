"""What the classification head reads: the architecture's own pooling, or the masked mean.

``model.pooling``: BERT's [CLS] pooler (through its dense + tanh), the first token of MPNet and
RoBERTa heads, a decoder's last non-pad token ("cls"), or the attention-masked mean of the last
hidden states ("mean"), which sentence encoders such as all-MiniLM-L6-v2 were trained for;
"auto" picks mean for such an encoder. ``dynft.model.build_model`` installs the mean.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynft.errors import ModelError
from dynft.families import family_of
from dynft.fingerprint import Pooling


def resolve_pooling(path: Path, setting: str) -> Pooling:
    """``model.pooling``: auto picks mean for a sentence-transformers encoder trained with mean pooling.

    "cls" is each architecture's own pooling: BERT's [CLS] pooler, the first token for MPNet and
    RoBERTa heads, the last non-pad token for decoder-only models.
    """
    if setting in ("cls", "mean"):
        return setting  # type: ignore[return-value]
    try:
        encoder = family_of(path).kind == "encoder"
        pooling = path / "1_Pooling" / "config.json"
        mean = pooling.is_file() and bool(json.loads(pooling.read_text()).get("pooling_mode_mean_tokens"))
    except (OSError, ValueError, AttributeError, ModelError):
        return "cls"  # unreadable configs: keep the architecture's own pooling (loading reports them)
    return "mean" if mean and encoder else "cls"


class MaskedMeanPooler(nn.Module):
    """Stands in for a BERT-style [CLS] pooler: the attention-masked mean of the last hidden states.

    Sentence encoders such as all-MiniLM-L6-v2 were trained for mean pooling; their [CLS] output
    (through the untrained pooler's dense + tanh) is a poor feature, and a head on it learns
    7 to 14 points slower on short streams (see benchmarks/results/quality/README.md). The
    pooler itself is only handed the hidden states, so a pre-hook on the encoder keeps the
    attention mask, per thread (the server and the gate may run forwards on other threads).
    """

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()

    def keep_mask(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._local.mask = kwargs.get("attention_mask")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, H)
        mask = getattr(self._local, "mask", None)
        self._local.mask = None
        if mask is None:
            return hidden.mean(dim=1)  # type: ignore[no-any-return]
        mask = mask[:, -hidden.shape[1] :]  # prefix tuning extends the mask by its virtual tokens
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled: torch.Tensor = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return pooled


class MeanBeforeHead(MaskedMeanPooler):
    """Mean pooling for heads that pick one token themselves (MPNet and RoBERTa heads, decoders' ``score``).

    A pre-hook on the head replaces every position's hidden state by the masked mean, so
    whichever token the head reads (the first, or a decoder's last non-pad one) holds the mean.
    """

    def replace(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]  # (B, T, H)
        return (self(hidden).unsqueeze(1).expand_as(hidden), *args[1:])


def pool_by_mean(base: nn.Module, path: Path) -> MeanBeforeHead | None:
    """Replace a [CLS] pooler by the masked mean; else return the hook to put before the head."""
    encoder = getattr(base, getattr(base, "base_model_prefix", ""), None)
    if encoder is None:
        raise ModelError(f"model.pooling = mean: {type(base).__name__} from {path} has no base model to pool")
    if getattr(encoder, "pooler", None) is not None:
        pooler = MaskedMeanPooler()
        encoder.pooler = pooler
        encoder.register_forward_pre_hook(pooler.keep_mask, with_kwargs=True)
        return None
    before_head = MeanBeforeHead()
    encoder.register_forward_pre_hook(before_head.keep_mask, with_kwargs=True)
    return before_head
