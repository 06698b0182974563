"""Durable writes: a file replaced whole (readers see the old one or the new one, never a mix),
files written into a directory before it is renamed into place, and the directory fsyncs that
make a rename survive a crash. Used by the registry, the checkpoints, the history, the dead
letters and the replicas' epoch file.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a file created or renamed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix.

    ``durable=False`` skips the fsyncs: for a copy that can be rebuilt (a replica's registry is
    read back from the versions topics at every start), atomicity is enough.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk should not also fill up with half-written temporaries
        raise
    if durable:
        fsync_dir(path.parent)


def write_files(directory: Path, files: dict[str, bytes], durable: bool = True) -> None:
    """Write and fsync each file, then the directory (before it is renamed into place)."""
    for name, data in files.items():
        with open(directory / name, "wb") as fh:
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
    if durable:
        fsync_dir(directory)
