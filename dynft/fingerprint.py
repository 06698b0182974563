"""The base model's identity, recorded with every adapter version and checkpoint built on it.

An adapter means nothing on another base model, so each version records a fingerprint of the
model it was trained on, and the server, the trainer and ``promote`` refuse a version whose
fingerprint is not theirs. Scheme 2 (values start with ``w2-``) hashes the files that decide
what the model computes: ``config.json``, the tokenizer's vocabulary and every weight file,
by name, size and content. Each file is read once per process and its digest cached by
(path, size, mtime), so a 470 MB model costs about 0.7 s of SHA-256 at a process start and
nothing afterwards. Scheme 1, the first one, hashed ``config.json`` only: a version recorded
with it (a value without the prefix) is checked the old way, so it keeps loading.

>>> BaseModelId("w2-new", "old").accepts("old"), BaseModelId("w2-new", "old").accepts("w2-other")
(True, False)
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Pooling = Literal["cls", "mean"]
SCHEME_PREFIX = "w2-"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
TOKENIZER_FILES = frozenset(
    {"tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "tokenizer.model"}
)

_digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256; any thread may fill it
_digests_lock = threading.Lock()


def legacy_fingerprint(path: Path, pooling: Pooling = "cls") -> str:
    """Scheme 1: a short hash of ``config.json`` (and the pooling, unless "cls")."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    if pooling != "cls":  # "cls" keeps the fingerprints of versions published before pooling existed
        digest.update(f"pooling={pooling}".encode())
    return digest.hexdigest()[:16]


def _file_digest(file: Path) -> str:
    st = file.stat()
    key = (str(file.resolve()), st.st_size, st.st_mtime_ns)
    with _digests_lock:
        known = _digests.get(key)
    if known is not None:
        return known
    with open(file, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    with _digests_lock:
        _digests[key] = digest
    return digest


def fingerprinted_files(path: Path) -> list[Path]:
    """The files scheme 2 covers: config, tokenizer vocabulary, weights (top level, sorted)."""
    names = sorted(os.listdir(path))
    return [
        path / name
        for name in names
        if (name == "config.json" or name in TOKENIZER_FILES or name.endswith(WEIGHT_SUFFIXES))
        and (path / name).is_file()
    ]


def model_fingerprint(path: Path, pooling: Pooling = "cls") -> str:
    """Scheme 2: ``w2-`` and a short hash over the names, sizes and contents of the model's files.

    The pooling is part of it because a head trained on mean-pooled features means nothing on
    [CLS] features: a server that pools otherwise refuses the version instead of serving noise.
    """
    digest = hashlib.sha256(f"pooling={pooling}".encode())
    for file in fingerprinted_files(path):
        digest.update(f"\n{file.name}:{file.stat().st_size}:{_file_digest(file)}".encode())
    return SCHEME_PREFIX + digest.hexdigest()[:16]


@dataclass(frozen=True)
class BaseModelId:
    """The fingerprint of the base model in use, in both schemes, to check recorded ones against."""

    fingerprint: str  # scheme 2, what new versions record
    legacy: str  # scheme 1, what versions published before scheme 2 recorded

    @classmethod
    def of(cls, path: Path, pooling: Pooling = "cls") -> BaseModelId:
        return cls(model_fingerprint(path, pooling), legacy_fingerprint(path, pooling))

    def accepts(self, recorded: object) -> bool:
        """Whether a version that recorded ``recorded`` was trained on this base model.

        ``None`` (nothing recorded: a version written by hand or before fingerprints) is accepted,
        as the server always did; a scheme-1 value is compared with the scheme-1 fingerprint.
        """
        if recorded is None:
            return True
        if isinstance(recorded, str) and recorded.startswith(SCHEME_PREFIX):
            return recorded == self.fingerprint
        return recorded == self.legacy
