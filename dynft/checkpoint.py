"""Checkpoints: the trainer's whole state on disk, written atomically, read back after a restart.

A checkpoint is a directory ``ckpt-<seq>`` holding tensors (safetensors), JSON state and JSON
Lines files (buffer, held-out window). It is written under ``.staging``, every file fsynced,
then renamed into place and the parent directory fsynced: a crash leaves either the previous
checkpoint or the new one, never a torn one. A checkpoint that fails to load (a disk that
lied) is skipped in favour of the one before it. Nothing here uses pickle.

>>> import tempfile, torch
>>> store = CheckpointStore(Path(tempfile.mkdtemp()))
>>> _ = store.save(Checkpoint({"w": torch.ones(2)}, {"steps": 3}, {"buffer.jsonl": [{"id": "a"}]}))
>>> loaded = store.latest()
>>> loaded.state["steps"], loaded.records["buffer.jsonl"]
(3, [{'id': 'a'}])
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from dynft.durable import fsync_dir
from dynft.errors import DynftError

log = logging.getLogger(__name__)
TENSORS, STATE = "tensors.safetensors", "state.json"


class CheckpointError(DynftError):
    """A checkpoint cannot be written (disk full, unwritable state directory)."""


@dataclass
class Checkpoint:
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # file name -> JSON objects
    path: Path | None = None


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


class CheckpointStore:
    def __init__(self, root: Path, keep: int = 2) -> None:
        self.root = root
        self.keep = keep
        self.staging = root / ".staging"

    def _complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.name.startswith("ckpt-") and p.is_dir())

    def save(self, checkpoint: Checkpoint) -> Path:
        """Write ``checkpoint`` as the newest one; older ones beyond ``keep`` are removed."""
        stage = self.staging / uuid.uuid4().hex
        try:
            existing = self._complete()
            seq = int(existing[-1].name.split("-")[1]) + 1 if existing else 1
            target = self.root / f"ckpt-{seq:09d}"
            stage.mkdir(parents=True)
            tensors = {k: t.detach().to("cpu").contiguous() for k, t in checkpoint.tensors.items()}
            _write(stage / TENSORS, save_safetensors(tensors))
            _write(stage / STATE, json.dumps(checkpoint.state).encode())
            for name, rows in checkpoint.records.items():
                _write(stage / name, b"".join(json.dumps(r).encode() + b"\n" for r in rows))
            fsync_dir(stage)
            os.rename(stage, target)
            fsync_dir(self.root)
        except OSError as exc:
            shutil.rmtree(stage, ignore_errors=True)  # frees what the torn attempt took
            raise CheckpointError(
                f"cannot write a checkpoint in {self.root} ({exc.strerror or exc}: {exc.filename or self.root})"
            ) from exc
        for old in self._complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that loads cleanly, or None. Leftover staging is removed."""
        shutil.rmtree(self.staging, ignore_errors=True)
        for path in reversed(self._complete()):
            try:
                return self.load(path)
            except (OSError, ValueError, SafetensorError) as exc:
                log.warning("skipping unreadable checkpoint %s: %s", path.name, exc)
        return None

    @staticmethod
    def load(path: Path) -> Checkpoint:
        tensors = load_safetensors((path / TENSORS).read_bytes())
        state = json.loads((path / STATE).read_text())
        records = {}
        for file in path.glob("*.jsonl"):
            records[file.name] = [json.loads(line) for line in file.read_text().splitlines() if line]
        return Checkpoint(tensors, state, records, path)
