"""The adapter registry: versioned, self-describing adapters on disk and the serving pointer.

Layout under the registry directory::

    versions/000007/adapter_config.json      peft config (loadable by peft as well)
                    adapter_model.safetensors adapter and head weights
                    labels.json               label names by head row
                    meta.json                 version, parent, lineage, step, metrics, gate, hash
    serving.json                              which version serves, pinned or not, and its history
    .staging/                                 versions being written (removed at start)

A version is written into ``.staging``, fsynced, and renamed into ``versions/`` in one step,
so a reader never sees a partial one. ``serving.json`` is replaced the same way, under a
file lock shared by every process that changes it (trainer, server, CLI).

>>> import tempfile, torch
>>> reg = AdapterRegistry(Path(tempfile.mkdtemp()))
>>> state = AdapterState({"w": torch.ones(2)}, ["a", "b"], {"peft_type": "LORA"})
>>> v = reg.publish(state, {"step": 10})
>>> reg.promote(v.version, reason="first version")
True
>>> reg.serving().version, reg.load(v.version)[0].labels
(1, ['a', 'b'])
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from dynft.durable import fsync_dir, write_atomic, write_files
from dynft.errors import (
    AdapterMismatchError,
    BaseModelMismatchError,
    DamagedPointerError,
    PointerUnreadableError,
    RegistryError,
    RegistryWriteError,
    VersionNotFoundError,
    VersionUnloadableError,
)
from dynft.fingerprint import BaseModelId
from dynft.lexical import WordScorer
from dynft.pointer import ServingPointer, damaged_pointer, now, pointer_problem, rollback_target

log = logging.getLogger(__name__)
WEIGHTS, CONFIG, LABELS, META = "adapter_model.safetensors", "adapter_config.json", "labels.json", "meta.json"
LEXICAL = "lexical.safetensors"  # word counts served beside the adapter (dynft.lexical); meta.json's lexical_hash
HASHED = (WEIGHTS, CONFIG, LABELS)  # meta.json's content_hash


@dataclass
class AdapterState:
    """A self-contained adapter: weights by peft state-dict key (CPU), labels by head row, peft config."""

    tensors: dict[str, torch.Tensor]
    labels: list[str]
    peft_config: dict[str, Any]
    finite: bool = False  # every tensor was found finite (by ``AdapterRegistry.load``): not checked again
    lexical: dict[str, torch.Tensor] | None = None  # word counts (dynft.lexical.Lexicon.state), if kept
    # ``lexical`` read and checked by ``AdapterRegistry.load``, for readers that only score with it
    # (a server's version, the gate's); whoever learns on counts takes its own copy (``Lexicon.from_state``).
    words: WordScorer | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def word_scorer(self) -> WordScorer | None:
        """What answers with this version's word counts (None without them): the registry's reading
        of them, else read now (``ValueError`` for malformed counts)."""
        if self.lexical is None:
            return None
        return self.words or WordScorer.read(self.lexical, len(self.labels))


@dataclass(frozen=True)
class VersionInfo:
    version: int
    path: Path
    meta: dict[str, Any]


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def check_base_model(version: int, meta: dict[str, Any], base_model: BaseModelId | None) -> None:
    """Refuse (``BaseModelMismatchError``) a version trained on another base model than ``base_model``."""
    if base_model is not None and not base_model.accepts(meta.get("base_model")):
        raise BaseModelMismatchError(
            f"adapter version {version} was trained on another base model "
            f"({meta.get('base_model')}, this one is {base_model.fingerprint})"
        )


def content_hash(files: dict[str, bytes]) -> str:
    """meta.json's ``content_hash``: SHA-256 of the ``HASHED`` files' bytes, one after the other
    (fed to the hash one at a time: a load makes no copy of their concatenation)."""
    digest = hashlib.sha256()
    for name in HASHED:
        digest.update(files[name])
    return digest.hexdigest()


def nonfinite_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The floating-point tensors holding a NaN or an infinity. One check over all of them at
    once (an adapter is a few hundred KB, and one kernel call per tensor costs more than that):
    their sum, which is finite only if every value is (a NaN or an infinity makes it NaN or
    infinite), and costs less than an element-wise check. Only if it is not (also when finite
    values add up past the float range) are they looked at one by one, to name the culprits."""
    floats = {k: t for k, t in tensors.items() if t.is_floating_point()}
    if not floats or bool(torch.cat([t.reshape(-1).float() for t in floats.values()]).sum().isfinite()):
        return []
    return [k for k, t in floats.items() if not bool(torch.isfinite(t).all())]


class AdapterRegistry:
    """Publishes and resolves adapter versions; ``publish``/``promote``/``rollback`` are atomic."""

    def __init__(self, root: Path, keep_last: int = 10, keep_serving_history: int = 5) -> None:
        self.root = root
        self.keep_last = keep_last
        self.keep_serving_history = keep_serving_history
        self.versions_dir = root / "versions"
        self.staging_dir = root / ".staging"
        self.pointer_path = root / "serving.json"
        try:
            self._make_dirs(first=True)
        except OSError as exc:
            raise RegistryError(f"registry {root}: cannot create it ({exc.strerror})") from exc

    def _make_dirs(self, first: bool = False) -> None:
        """The registry's folders, made again where someone deleted them while it runs (a write
        would otherwise fail until a restart); OSError where they cannot be made."""
        if self.versions_dir.is_dir() and self.staging_dir.is_dir():
            return
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self.staging_dir.mkdir(exist_ok=True)
        if not first:
            log.warning("registry %s: its versions or staging folder was missing (deleted?); made again", self.root)

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """Report a failed write (disk full, read-only, permissions) as one error naming the file and why."""
        try:
            yield
        except OSError as exc:
            where = exc.filename or self.root
            raise RegistryWriteError(f"registry {self.root}: cannot {what} ({exc.strerror or exc}: {where})") from exc

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def clean_staging(self) -> list[str]:
        """Remove versions left half-written by a crash; returns what was removed."""
        removed = []
        with self._locked():
            for entry in self.staging_dir.iterdir():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
        return removed

    def versions(self) -> list[int]:
        """Published version numbers, ascending (none while the versions folder is missing)."""
        try:
            return sorted(int(p.name) for p in self.versions_dir.iterdir() if p.name.isdigit() and p.is_dir())
        except (FileNotFoundError, NotADirectoryError):  # deleted under a running server, say
            return []

    def path(self, version: int) -> Path:
        return self.versions_dir / f"{version:06d}"

    def stamp(self, version: int) -> tuple[tuple[str, int, int, int], ...] | None:
        """Name, size, mtime and inode of each of ``version``'s files (None if unreadable): a change
        of any file, replaced or rewritten, changes it, for the price of a few ``stat`` calls."""
        try:
            return tuple(
                (p.name, st.st_size, st.st_mtime_ns, st.st_ino)
                for p in sorted(self.path(version).iterdir())
                for st in (p.stat(),)
            )
        except OSError:
            return None

    def publish(self, state: AdapterState, meta: dict[str, Any]) -> VersionInfo:
        """Write ``state`` as the next version; ``meta`` is stored with the version number and hash added."""
        bad = nonfinite_keys(state.tensors)
        if bad:
            raise RegistryError(f"refusing to publish an adapter with non-finite weights ({bad[0]})")
        files = {
            WEIGHTS: save_safetensors({k: t.contiguous() for k, t in state.tensors.items()}),
            CONFIG: _json_bytes(state.peft_config),
            LABELS: _json_bytes(state.labels),
        }
        digest = content_hash(files)
        if state.lexical is not None:  # hashed apart: servers that predate word counts still load the adapter
            files[LEXICAL] = save_safetensors(state.lexical)
            meta = {**meta, "lexical_hash": hashlib.sha256(files[LEXICAL]).hexdigest()}
        stage = self.staging_dir / uuid.uuid4().hex
        parent = meta.get("parent")
        try:
            self._make_dirs()
            stage.mkdir()
            with self._locked():
                # Above the parent too: numbers are never reused, even where the versions were deleted.
                version = max(*self.versions(), self._highest_named(), parent if isinstance(parent, int) else 0, 0) + 1
                full_meta = {**meta, "version": version, "created_at": now(), "content_hash": digest}
                files[META] = _json_bytes(full_meta)
                write_files(stage, files)
                os.rename(stage, self.path(version))
                fsync_dir(self.versions_dir)
        except OSError as exc:
            shutil.rmtree(stage, ignore_errors=True)
            raise RegistryWriteError(
                f"registry {self.root}: cannot write a version ({exc.strerror or exc}: {exc.filename or stage})"
            ) from exc
        return VersionInfo(version, self.path(version), full_meta)

    def _highest_named(self) -> int:
        """The highest version the serving pointer names (now or in its history): numbers are never
        reused, even when versions were deleted by hand (a rollback, or a replica that saw "v3",
        would name another model). A pointer that cannot be read names none here."""
        try:
            pointer = self.serving()
        except RegistryError:
            return 0
        return max([pointer.version or 0, *(int(h["version"]) for h in pointer.history)])

    def meta(self, version: int) -> dict[str, Any]:
        try:
            data = json.loads((self.path(version) / META).read_bytes())
        except FileNotFoundError as exc:
            raise VersionNotFoundError(version) from exc
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: not JSON, or not UTF-8
            raise VersionUnloadableError(f"adapter version {version}: unreadable meta.json ({exc})") from exc
        if not isinstance(data, dict):
            raise VersionUnloadableError(f"adapter version {version}: meta.json holds no JSON object")
        return data

    def load(self, version: int) -> tuple[AdapterState, dict[str, Any]]:
        """The adapter of ``version`` on CPU, after checking its content hash and that its weights are finite."""
        meta = self.meta(version)
        if meta.get("version") != version:  # another version's files under this number (copied, or forged)
            raise AdapterMismatchError(f"adapter version {version}: its meta.json is version {meta.get('version')!r}")
        path = self.path(version)
        try:
            files = {name: (path / name).read_bytes() for name in HASHED}
            if "lexical_hash" in meta:
                files[LEXICAL] = (path / LEXICAL).read_bytes()
        except OSError as exc:
            raise VersionUnloadableError(
                f"adapter version {version}: incomplete ({exc.strerror}: {exc.filename})"
            ) from exc
        digest = content_hash(files)
        lexical = hashlib.sha256(files[LEXICAL]).hexdigest() if LEXICAL in files else None
        if digest != meta.get("content_hash") or lexical != meta.get("lexical_hash"):
            raise VersionUnloadableError(f"adapter version {version}: content hash mismatch (corrupt files)")
        try:
            tensors = load_safetensors(files[WEIGHTS])
            state = AdapterState(tensors, json.loads(files[LABELS]), json.loads(files[CONFIG]))
            if LEXICAL in files:
                state.lexical = load_safetensors(files[LEXICAL])
                state.words = WordScorer.read(state.lexical, len(state.labels))  # a version loads whole or not
        except (SafetensorError, json.JSONDecodeError, ValueError) as exc:  # ValueError: malformed word counts
            raise VersionUnloadableError(f"adapter version {version}: unreadable files ({exc})") from exc
        bad = nonfinite_keys(tensors)
        if bad:  # publish refuses these; a version written by other means must not serve them either
            raise VersionUnloadableError(f"adapter version {version}: non-finite weights ({bad[0]})")
        state.finite = True
        return state, meta

    def serving(self) -> ServingPointer:
        try:
            data = json.loads(self.pointer_path.read_bytes())
        except FileNotFoundError:
            return ServingPointer()
        except (ValueError, RecursionError) as exc:  # garbage, NULs after a power loss, empty: restarting cannot help
            raise DamagedPointerError(damaged_pointer(self.pointer_path, str(exc))) from exc
        except OSError as exc:
            raise PointerUnreadableError(f"registry {self.root}: unreadable serving.json ({exc})") from exc
        problem = pointer_problem(data)
        if problem is not None:
            raise DamagedPointerError(damaged_pointer(self.pointer_path, problem))
        return ServingPointer(**data)

    def _set_serving(self, version: int, reason: str, pinned: bool) -> None:
        current = self.serving()
        history = current.history
        if current.version is not None and current.version != version:
            history = [{"version": current.version, "reason": current.reason, "updated_at": current.updated_at}]
            history += current.history[:49]
        pointer = ServingPointer(version, pinned, reason, now(), history)
        write_atomic(self.pointer_path, _json_bytes(pointer.__dict__))

    def promote(
        self,
        version: int,
        reason: str,
        pin: bool = False,
        base_model: BaseModelId | None = None,
        unless_pinned: bool = False,
    ) -> bool:
        """Make ``version`` the serving one, after checking under the lock that it exists and loads;
        returns whether it does now.

        With ``base_model``, a version trained on another base model is refused as well
        (``BaseModelMismatchError``). The check and the pointer write hold the registry lock
        together, so retention cannot remove the version between them. ``unless_pinned`` (the
        gate's promotions): nothing changes if an operator pinned the serving version, which may
        have happened while the gate was judging.
        """
        with self._writing("write serving.json"), self._locked():
            if unless_pinned and self.serving().pinned:
                return False
            _, meta = self.load(version)
            check_base_model(version, meta, base_model)
            self._set_serving(version, reason, pin)
        self.prune()
        return True

    def rollback(self, reason: str = "rollback") -> int:
        """Serve the previous serving version again (pinned, so the gate will not replace it)."""
        with self._writing("write serving.json"), self._locked():
            current = self.serving()
            target = rollback_target(current, self.versions())
            self.load(target)
            rest = [h for h in current.history if h["version"] != target]
            pointer = ServingPointer(target, True, reason, now(), rest)
            write_atomic(self.pointer_path, _json_bytes(pointer.__dict__))
        return int(target)

    def unpin(self) -> None:
        with self._writing("write serving.json"), self._locked():
            current = self.serving()
            if current.version is not None and current.pinned:
                current.pinned = False
                write_atomic(self.pointer_path, _json_bytes(current.__dict__))

    def prune(self) -> list[int]:
        """Apply retention: the last ``keep_last`` versions, the serving one and its recent history stay.

        Retention is housekeeping: if the registry cannot be written, the versions stay, a warning
        says why, and the next prune tries again.
        """
        removed: list[int] = []
        try:
            with self._writing("remove old versions"), self._locked():
                versions = self.versions()
                pointer = self.serving()
                keep = set(versions[-self.keep_last :])
                if pointer.version is not None:
                    keep.add(pointer.version)
                keep.update(h["version"] for h in pointer.history[: self.keep_serving_history])
                for version in (v for v in versions if v not in keep):
                    trash = self.staging_dir / f"pruned-{version}-{uuid.uuid4().hex[:6]}"
                    os.rename(self.path(version), trash)  # one atomic step out of versions/
                    shutil.rmtree(trash, ignore_errors=True)
                    removed.append(version)
        except RegistryWriteError as exc:
            log.warning("%s; old versions stay until the next prune", exc)
        return removed

    # -- replicas (dynft.replication.follower): versions and pointer written as received ----

    def materialise(self, version: int, files: dict[str, bytes], durable: bool = True) -> bool:
        """Write a version received from the versions topic, unchecked, as its publisher wrote it.

        The files are checked when the version is loaded (content hash, fingerprint), exactly
        as for a version published here. Returns False when this exact version is already here.
        ``durable=False``: no fsyncs (the topic keeps the copy that survives a crash).
        """
        target = self.path(version)
        stage = self.staging_dir / uuid.uuid4().hex
        with self._writing(f"write version {version}"):  # the comparison reads: its failures are reported too
            if target.exists() and all(
                (target / n).exists() and (target / n).read_bytes() == data for n, data in files.items()
            ):
                return False
            self._make_dirs()
            stage.mkdir()
            write_files(stage, files, durable)
            with self._locked():
                if target.exists():  # another publisher's version of the same number: the newer record wins
                    trash = self.staging_dir / f"replaced-{version}-{uuid.uuid4().hex[:6]}"
                    os.rename(target, trash)
                    shutil.rmtree(trash, ignore_errors=True)
                os.rename(stage, target)
                if durable:
                    fsync_dir(self.versions_dir)
        return True

    def replace_serving(self, pointer: ServingPointer, durable: bool = True) -> None:
        """Install a serving pointer decided elsewhere (a replica follows the pointer topic)."""
        with self._writing("write serving.json"), self._locked():
            write_atomic(self.pointer_path, _json_bytes(pointer.__dict__), durable)

    def discard(self, version: int) -> None:
        """Remove one version (a replica following the trainer's retention); absent is fine."""
        with self._writing(f"remove version {version}"), self._locked():
            if self.path(version).exists():
                trash = self.staging_dir / f"discarded-{version}-{uuid.uuid4().hex[:6]}"
                os.rename(self.path(version), trash)
                shutil.rmtree(trash, ignore_errors=True)
