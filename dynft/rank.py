"""Carrying a LoRA adapter over to another rank, so a changed ``adapter.r`` need not start from scratch.

A LoRA layer adds ``scale * B @ A`` to a frozen weight (``scale`` = alpha / r, or alpha / sqrt(r)
with rsLoRA). What the adapter learned is that product, not its factors, so an adapter of rank
r carries over to rank r' exactly when r' >= r, and as the best rank-r' approximation (truncated
SVD, Eckart-Young) when r' < r. The new factors split the singular values evenly between B and
A; rows of A beyond what the product needs keep the model's fresh initialisation and the
matching columns of B are zero, which is how peft starts every LoRA direction, so they train.
Everything else of the adapter (head, DoRA magnitudes) must already have the model's shape.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dynft.errors import AdapterMismatchError
from dynft.model import AdapterSlots, AdapterState

# peft config fields a rank conversion may change: the rest must be equal.
CONVERTIBLE = frozenset({"r", "lora_alpha", "use_rslora", "lora_dropout"})


def _scale(config: dict[str, Any]) -> float:
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def convert_lora_rank(state: AdapterState, slots: AdapterSlots) -> AdapterState:
    """``state`` re-expressed for the LoRA rank of ``slots``' model; raises ``AdapterMismatchError`` if it cannot be."""
    old, new = state.peft_config, slots.peft_config
    differs = {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
    if old.get("peft_type") != "LORA" or new.get("peft_type") != "LORA" or not differs <= CONVERTIBLE:
        raise AdapterMismatchError(f"only a LoRA rank can be converted; these differ: {sorted(differs)}")
    live = slots.capture()
    if state.tensors.keys() != live.keys():
        raise AdapterMismatchError("the adapters have different tensors")
    old_scale, new_scale = _scale(old), _scale(new)
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in state.tensors.items():
        if ".lora_B." in key:
            continue  # written with its lora_A
        if ".lora_A." not in key:
            tensors[key] = tensor
            continue
        b_key = key.replace(".lora_A.", ".lora_B.")
        delta = old_scale * state.tensors[b_key].double() @ tensor.double() / new_scale  # (out, in)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        fresh_a = live[key].detach().to("cpu", torch.float64)  # (r', in)
        rank = min(fresh_a.shape[0], int(old["r"]), s.numel())  # beyond the old rank, s is zero
        root = s[:rank].sqrt()
        a = fresh_a.clone()
        a[:rank] = root[:, None] * vh[:rank]
        b = torch.zeros(delta.shape[0], fresh_a.shape[0], dtype=torch.float64)  # (out, r')
        b[:, :rank] = u[:, :rank] * root
        tensors[key], tensors[b_key] = a.to(tensor.dtype), b.to(tensor.dtype)
    return AdapterState(tensors, list(state.labels), dict(new), lexical=state.lexical)  # word counts: rank-free
