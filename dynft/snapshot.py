"""Checking a trainer checkpoint against the live model before anything of it is restored.

``OnlineTrainer.restore`` must either restore everything or change nothing: a checkpoint that
no longer fits (another adapter rank, other target modules, a torn or hand-edited file) is
reported as one ``AdapterMismatchError`` naming what differs, and the caller starts a new
lineage with the trainer exactly as it was. So every tensor (presence, shape, dtype,
finiteness), the optimizer state and the counters are checked here first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dynft.errors import AdapterMismatchError
from dynft.model import AdapterSlots, structure_key


@dataclass(frozen=True)
class CheckedSnapshot:
    """A checkpoint's trainer part, checked: what ``restore`` installs."""

    labels: list[str]
    head_rows: int  # rows of the head when the checkpoint was written (at most len(labels))
    params: dict[str, torch.Tensor]  # adapter key -> saved weight
    optim_state: dict[int, dict[str, torch.Tensor]]
    param_groups: list[dict[str, Any]]
    rng: torch.Tensor
    counters: tuple[int, int, float]  # steps, skipped, lr_scale


def config_change(saved: dict[str, Any], live: dict[str, Any]) -> str:
    """The peft settings that differ, as ``name saved -> live`` (or '' when they are the same)."""
    keys = sorted(saved.keys() | live.keys())
    changed = [f"{k} {saved.get(k)!r} -> {live.get(k)!r}" for k in keys if saved.get(k) != live.get(k)]
    return ", ".join(changed)


def _check_labels(state: dict[str, Any], live_labels: list[str]) -> list[str]:
    labels = state.get("labels")
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise AdapterMismatchError("the checkpoint's label map is not a list of strings")
    if len(set(labels)) != len(labels):
        raise AdapterMismatchError("the checkpoint's label map names a label twice")
    if labels[: len(live_labels)] != live_labels:
        raise AdapterMismatchError("the checkpoint's label map does not extend the trainer's")
    return labels


def _check_params(
    slots: AdapterSlots, tensors: dict[str, torch.Tensor], labels: list[str]
) -> tuple[int, dict[str, torch.Tensor]]:
    params: dict[str, torch.Tensor] = {}
    rows: set[int] = set()
    for key, param in slots.capture().items():
        saved = tensors.get(f"param.{key}")
        if saved is None:
            raise AdapterMismatchError(f"the checkpoint has no tensor for {key}")
        expected = list(param.shape)
        if key in slots.head_keys:  # the head may have grown since; the saved rows decide
            rows.add(saved.shape[0] if saved.dim() else -1)
            expected[0] = saved.shape[0] if saved.dim() else -1
        if list(saved.shape) != expected:
            raise AdapterMismatchError(f"checkpoint {key}: shape {list(saved.shape)}, model {list(param.shape)}")
        if not saved.is_floating_point() or not bool(torch.isfinite(saved).all()):
            raise AdapterMismatchError(f"checkpoint {key}: dtype {saved.dtype}, or non-finite values")
        params[key] = saved
    head_rows = rows.pop() if len(rows) == 1 else -1
    if rows or not slots.head.out_features <= head_rows <= max(1, len(labels)):
        raise AdapterMismatchError(f"checkpoint head rows do not fit {len(labels)} labels and the live head")
    return head_rows, params


def _check_optimizer(
    optimizer: torch.optim.Optimizer,
    slots: AdapterSlots,
    tensors: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor],
    groups: Any,
) -> dict[int, dict[str, torch.Tensor]]:
    live_groups = optimizer.param_groups
    if not isinstance(groups, list) or [len(g.get("params", ())) for g in groups if isinstance(g, dict)] != [
        len(g["params"]) for g in live_groups
    ]:
        raise AdapterMismatchError("the checkpoint's optimizer groups do not match the model's parameters")
    key_of = {id(p): k for k, p in slots.capture().items()}
    ordered = [p for g in live_groups for p in g["params"]]  # the indices torch's state_dict uses
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if not name.startswith("optim."):
            continue
        index_text, _, field = name[len("optim.") :].partition(".")
        if not index_text.isdigit() or int(index_text) >= len(ordered) or not field:
            raise AdapterMismatchError(f"checkpoint {name}: no such optimizer parameter")
        index = int(index_text)
        if field != "step":
            shape = params[key_of[id(ordered[index])]].shape if id(ordered[index]) in key_of else ordered[index].shape
            if value.shape != shape or not bool(torch.isfinite(value).all()):
                raise AdapterMismatchError(f"checkpoint {name}: shape {list(value.shape)} or values do not fit")
        state.setdefault(index, {})[field] = value
    return state


def check_snapshot(
    slots: AdapterSlots,
    optimizer: torch.optim.Optimizer,
    live_labels: list[str],
    tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
) -> CheckedSnapshot:
    """Everything ``restore`` needs, checked against the live model; raises and changes nothing on a misfit."""
    saved_config = state.get("peft_config")
    if isinstance(saved_config, dict) and structure_key(saved_config) != structure_key(slots.peft_config):
        raise AdapterMismatchError(
            f"the adapter configuration changed: {config_change(saved_config, slots.peft_config)}"
        )
    labels = _check_labels(state, live_labels)
    head_rows, params = _check_params(slots, tensors, labels)
    optim_state = _check_optimizer(optimizer, slots, tensors, params, state.get("param_groups"))
    rng = tensors.get("rng.torch")
    if rng is None or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        raise AdapterMismatchError("the checkpoint's random generator state is missing or malformed")
    try:
        counters = (int(state["steps"]), int(state["skipped"]), float(state["lr_scale"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterMismatchError(f"the checkpoint's counters are missing or malformed ({exc!r})") from exc
    return CheckedSnapshot(labels, head_rows, params, optim_state, state["param_groups"], rng, counters)
