"""One copy of the frozen base weights for every process of a host (CPU, ``model.share_base_weights``).

``dynft run`` trains and serves in two processes, and each loads the base model: on CPU, two
private copies of the same frozen weights (87 MB for MiniLM in fp32, 28 GB for a 7B model).
Here a process points its frozen parameters at one file of the state directory, mapped
copy-on-write (``torch.from_file(shared=False)``): its pages come from the page cache, which the
processes share, and are never written (the base is frozen; an accidental write would copy the
page privately and never reach the file). The file is named by the layout it holds (parameter
names, shapes, dtypes) and the base model's fingerprint, is written atomically by the first
process that needs it, and is compared with the weights just loaded before any parameter is
repointed: a stale or damaged file is replaced, never trusted. A process that cannot write or
map it keeps its private copy and says why. Called once per model, before it is used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

ALIGN = 64  # bytes: every tensor starts on a cache line
SHARED_DIR = Path("run")  # under the state directory
HEAD_COPIES = {"original_module", "modules_to_save"}  # peft's copies of the head


def share_frozen(model: nn.Module, directory: Path, fingerprint: str) -> int:
    """Repoint ``model``'s frozen CPU parameters at the shared file; returns the bytes now shared."""
    frozen = [
        (name, p)
        for name, p in model.named_parameters()
        if not p.requires_grad
        and p.device.type == "cpu"
        and p.dtype.is_floating_point
        and p.numel()
        and not HEAD_COPIES.intersection(name.split("."))  # sized by the label count, which differs
    ]
    dtypes = {p.dtype for _, p in frozen}
    if len(dtypes) != 1:  # nothing frozen, or mixed dtypes (quantised models): left alone
        return 0
    dtype = dtypes.pop()
    step = ALIGN // dtype.itemsize
    offsets, total = [], 0
    for _, p in frozen:
        offsets.append(total)
        total += -(-p.numel() // step) * step
    layout = "\n".join(f"{name}:{tuple(p.shape)}" for name, p in frozen)
    digest = hashlib.sha256(f"{fingerprint}\n{dtype}\n{layout}".encode()).hexdigest()[:16]
    path = directory / f"frozen-{digest}.bin"
    try:
        flat = _mapped(path, frozen, offsets, total, dtype)
    except OSError as exc:
        log.warning("the frozen base weights stay private to this process: %s", exc)
        return 0
    with torch.no_grad():
        for (_, p), start in zip(frozen, offsets, strict=True):
            p.data = flat[start : start + p.numel()].view(p.shape)
    return sum(p.numel() for _, p in frozen) * dtype.itemsize


def _mapped(
    path: Path, frozen: list[tuple[str, nn.Parameter]], offsets: list[int], total: int, dtype: torch.dtype
) -> torch.Tensor:
    """The file mapped copy-on-write, written first if missing or if it differs from ``frozen``."""
    if path.exists() and path.stat().st_size == total * dtype.itemsize:
        flat = torch.from_file(str(path), shared=False, size=total, dtype=dtype)
        if _holds(flat, frozen, offsets):
            return flat
        log.warning("%s does not hold this model's weights; writing it again", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".frozen-")
    try:
        with os.fdopen(fd, "wb") as fh:
            for (_, p), start in zip(frozen, offsets, strict=True):
                fh.seek(start * dtype.itemsize)
                fh.write(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
            fh.truncate(total * dtype.itemsize)
        os.replace(tmp, path)  # a process that mapped the old file keeps its pages
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    flat = torch.from_file(str(path), shared=False, size=total, dtype=dtype)
    if not _holds(flat, frozen, offsets):
        raise OSError(f"{path} does not read back as written")
    return flat


def _holds(flat: torch.Tensor, frozen: list[tuple[str, nn.Parameter]], offsets: list[int]) -> bool:
    return all(
        torch.equal(flat[start : start + p.numel()].view(p.shape), p.detach())
        for (_, p), start in zip(frozen, offsets, strict=True)
    )
