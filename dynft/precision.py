"""Compute precision: which dtype the model's matrix products run in (``model.autocast``).

The frozen base weights keep ``model.dtype``, the adapter, head and optimizer stay fp32; under
``torch.autocast`` the matrix products run in bf16 (fp16 where the weights are fp16). On a GPU
this is the usual mixed precision. On a CPU with native bf16 (AVX512-BF16 or AMX), a LoRA step of
the default MiniLM runs about 1.5x faster in bf16 than in fp32 (measured on a 2-core AMD EPYC with
AVX512-BF16, batch 16 x 64 tokens, one thread: 0.42-0.51 s against 0.70-0.77 s), so ``auto``
turns it on there too; a CPU without native bf16 would emulate it, slower than fp32, so ``auto``
leaves it off. The trainer, the gate (which scores with the trainer) and the server all compute
in the same precision, so the gate judges what the server will answer.

>>> import torch
>>> autocast_dtype("off", torch.device("cpu"), torch.float32) is None
True
>>> autocast_dtype("on", torch.device("cpu"), torch.float32)
torch.bfloat16
"""

from __future__ import annotations

import contextlib

import torch

from dynft.errors import ConfigError


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX tiles); False where torch
    cannot tell (the probes are private to ``torch.cpu`` and may move)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(probe()) for probe in probes if callable(probe))


def autocast_dtype(setting: str, device: torch.device, weights: torch.dtype) -> torch.dtype | None:
    """The dtype ``model.autocast`` computes in on ``device`` with base weights of ``weights``; None: no autocast."""
    if setting == "off":
        if weights != torch.float32:
            raise ConfigError(f"model.autocast = off needs fp32 base weights (model.dtype gives {weights}); use auto")
        return None
    if device.type == "cuda":
        return torch.float16 if weights == torch.float16 else torch.bfloat16
    if setting == "on" or cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[None]:
    """``torch.autocast`` to ``dtype`` on ``device``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
