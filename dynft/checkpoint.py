"""Checkpoints: the trainer's whole state on disk, written atomically, read back after a restart.

A checkpoint is a directory ``ckpt-<seq>`` holding tensors (safetensors), JSON state and JSON
Lines files (buffer, held-out window). It is written under ``.staging``, every file fsynced,
then renamed into place and the parent directory fsynced: a crash leaves either the previous
checkpoint or the new one, never a torn one. A checkpoint that fails to load (a disk that
lied) is skipped in favour of the one before it, and so is one whose files are not all there with
the sizes and CRC-32s its manifest lists (a file deleted, cut or changed since), or whose state its owner
finds unrestorable (``loadable``'s ``check``). Nothing here uses pickle.

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
import zlib
from collections.abc import Callable
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
TENSORS, STATE, MANIFEST = "tensors.safetensors", "state.json", "manifest.json"
CRC32 = "crc32"  # the manifest's map of each file to its bytes' CRC-32 (beside the records' sizes)


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

    def has_any(self) -> bool:
        """Whether a checkpoint was ever completed here (restorable or not)."""
        return bool(self._complete())

    def save(self, checkpoint: Checkpoint) -> Path:
        """Write ``checkpoint`` as the newest one; older ones beyond ``keep`` are removed."""
        stage = self.staging / uuid.uuid4().hex
        try:
            existing = self._complete()
            seq = int(existing[-1].name.split("-")[1]) + 1 if existing else 1
            target = self.root / f"ckpt-{seq:09d}"
            stage.mkdir(parents=True)
            tensors = {k: t.detach().to("cpu").contiguous() for k, t in checkpoint.tensors.items()}
            files = {TENSORS: save_safetensors(tensors), STATE: json.dumps(checkpoint.state).encode()}
            sizes: dict[str, Any] = {}
            for name, rows in checkpoint.records.items():
                files[name] = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
                sizes[name] = len(files[name])
            for name, data in files.items():
                _write(stage / name, data)
            sizes[CRC32] = {name: zlib.crc32(data) for name, data in files.items()}
            _write(stage / MANIFEST, json.dumps(sizes).encode())  # last: a checkpoint's files, as written
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

    def latest(self, check: Callable[[Checkpoint], str | None] | None = None) -> Checkpoint | None:
        """The newest checkpoint that loads cleanly (and that ``check`` finds no problem with), or
        None. Leftover staging is removed."""
        shutil.rmtree(self.staging, ignore_errors=True)
        for path in reversed(self._complete()):
            try:
                checkpoint = self.load(path)
            except (OSError, ValueError, SafetensorError) as exc:
                log.warning("skipping unreadable checkpoint %s: %s", path.name, exc)
                continue
            problem = check(checkpoint) if check is not None else None
            if problem is None:
                return checkpoint
            log.warning("skipping checkpoint %s, which cannot be restored: %s", path.name, problem)
        return None

    @staticmethod
    def load(path: Path) -> Checkpoint:
        sizes = json.loads((path / MANIFEST).read_text()) if (path / MANIFEST).exists() else None  # older: none
        if sizes is not None and not isinstance(sizes, dict):
            raise ValueError(f"{MANIFEST} holds no JSON object")
        crcs = sizes.pop(CRC32, {}) if sizes is not None else {}  # older: sizes only
        if not isinstance(crcs, dict):
            raise ValueError(f"{MANIFEST}'s {CRC32} holds no JSON object")

        def read(name: str) -> bytes:
            data = (path / name).read_bytes()
            if name in crcs and zlib.crc32(data) != crcs[name]:  # bytes changed since (values a shape check passes)
                raise ValueError(f"{name} does not hold the bytes written (its CRC-32 differs)")
            return data

        tensors = load_safetensors(read(TENSORS))
        state = json.loads(read(STATE))
        if not isinstance(state, dict):
            raise ValueError(f"{STATE} holds no JSON object")
        records = {}
        for name in sizes if sizes is not None else (file.name for file in path.glob("*.jsonl")):
            data = read(name)
            if sizes is not None and len(data) != sizes[name]:
                raise ValueError(f"{name} is {len(data)} bytes, {sizes[name]} when written")
            records[name] = [json.loads(line) for line in data.splitlines() if line]
        return Checkpoint(tensors, state, records, path)
