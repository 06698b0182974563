from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

from dynft.errors import BaseModelMismatchError, DamagedPointerError, RegistryError, VersionUnloadableError, exit_code
from dynft.fingerprint import BaseModelId
from dynft.model import AdapterState
from dynft.registry import HASHED, AdapterRegistry


def state(value: float = 1.0, labels: tuple[str, ...] = ("a", "b")) -> AdapterState:
    return AdapterState(
        {"lora.w": torch.full((2, 3), value), "head.w": torch.full((len(labels), 3), value)},
        list(labels),
        {"peft_type": "LORA", "r": 8},
    )


def test_publish_and_load_round_trip(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path)
    info = reg.publish(state(2.0), {"step": 5, "lineage": 1})
    loaded, meta = reg.load(info.version)
    assert torch.equal(loaded.tensors["lora.w"], torch.full((2, 3), 2.0))
    assert loaded.labels == ["a", "b"] and loaded.peft_config["r"] == 8
    assert meta["version"] == 1 and meta["step"] == 5 and len(meta["content_hash"]) == 64
    assert sorted(p.name for p in info.path.iterdir()) == sorted([*HASHED, "meta.json"])


def test_versions_count_up_and_serving_moves_with_history(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path)
    versions = [reg.publish(state(float(i)), {}).version for i in range(3)]
    assert versions == [1, 2, 3]
    assert reg.serving().version is None
    reg.promote(1, "first")
    reg.promote(3, "better")
    pointer = reg.serving()
    assert (pointer.version, pointer.pinned, pointer.reason) == (3, False, "better")
    assert [h["version"] for h in pointer.history] == [1]
    assert reg.rollback("oops") == 1
    assert (reg.serving().version, reg.serving().pinned) == (1, True)
    reg.unpin()
    assert not reg.serving().pinned
    with pytest.raises(RegistryError, match="no earlier serving version"):
        reg.rollback()


def test_a_corrupt_version_is_refused(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path)
    info = reg.publish(state(), {})
    weights = info.path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="content hash mismatch"):
        reg.load(info.version)
    with pytest.raises(RegistryError, match="content hash mismatch"):
        reg.promote(info.version, "no")
    (info.path / "labels.json").unlink()
    with pytest.raises(RegistryError, match="incomplete"):
        reg.load(info.version)
    with pytest.raises(RegistryError, match="does not exist"):
        reg.load(99)


def test_non_finite_adapters_are_never_published(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path)
    with pytest.raises(RegistryError, match="non-finite"):
        reg.publish(state(float("inf")), {})
    assert reg.versions() == []


def test_half_written_versions_are_cleaned_at_start(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path)
    (reg.staging_dir / "abc123").mkdir()
    (reg.staging_dir / "abc123" / "adapter_model.safetensors").write_bytes(b"partial")
    assert reg.clean_staging() == ["abc123"]
    assert list(reg.staging_dir.iterdir()) == []
    assert reg.versions() == []


def test_retention_keeps_the_last_n_the_serving_one_and_its_history(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path, keep_last=3, keep_serving_history=1)
    for i in range(12):
        reg.publish(state(float(i)), {})
        if i in (1, 4):
            reg.promote(i + 1, "gate")
    reg.prune()
    assert reg.versions() == [2, 5, 10, 11, 12]  # v5 serves, v2 served before it
    reg.promote(12, "gate")
    assert reg.versions() == [5, 10, 11, 12]


PUBLISHER = """
import sys, torch
from pathlib import Path
from dynft.model import AdapterState
from dynft.registry import AdapterRegistry
reg = AdapterRegistry(Path(sys.argv[1]))
for i in range(10):
    reg.publish(AdapterState({"w": torch.full((2,), float(i))}, ["a"], {"peft_type": "LORA"}), {})
"""


def test_concurrent_publishers_get_distinct_versions(tmp_path: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", PUBLISHER, str(tmp_path)]) for _ in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    reg = AdapterRegistry(tmp_path)
    assert reg.versions() == list(range(1, 31))
    for v in reg.versions():
        reg.load(v)  # every one complete and intact


def test_serving_pointer_is_plain_json(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path)
    reg.promote(reg.publish(state(), {}).version, "first")
    data = json.loads((tmp_path / "serving.json").read_text())
    assert data["version"] == 1 and data["pinned"] is False


# -- promote checks -----------------------------------------------------------------------

BASE = BaseModelId("w2-thisbasemodel0", "legacy0000000000")


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_promote_refuses_a_missing_corrupt_or_foreign_version_and_keeps_the_pointer(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path)
    good = reg.publish(state(1.0), {"base_model": BASE.fingerprint}).version
    broken = reg.publish(state(2.0), {"base_model": BASE.fingerprint})
    corrupt(broken.path / "adapter_model.safetensors")
    foreign = reg.publish(state(3.0), {"base_model": "w2-anotherbasemod"}).version
    legacy = reg.publish(state(4.0), {"base_model": BASE.legacy}).version  # published before scheme 2
    reg.promote(good, "start", base_model=BASE)
    refusals: list[tuple[int, type[Exception]]] = [
        (99, RegistryError),  # does not exist
        (broken.version, VersionUnloadableError),
        (foreign, BaseModelMismatchError),
    ]
    for version, error in refusals:
        with pytest.raises(error):
            reg.promote(version, "operator", pin=True, base_model=BASE)
        pointer = reg.serving()
        assert (pointer.version, pointer.pinned, pointer.reason) == (good, False, "start")
    reg.promote(legacy, "old scheme", base_model=BASE)  # an old-scheme fingerprint is checked the old way
    assert reg.serving().version == legacy


def test_promote_refuses_non_finite_weights_written_by_other_means(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path)
    info = reg.publish(state(1.0), {})
    bad = {"lora.w": torch.full((2, 3), float("nan")), "head.w": torch.ones(2, 3)}
    (info.path / "adapter_model.safetensors").write_bytes(save_safetensors(bad))
    files = b"".join((info.path / name).read_bytes() for name in HASHED)
    meta = json.loads((info.path / "meta.json").read_text())
    meta["content_hash"] = hashlib.sha256(files).hexdigest()  # consistent files, only the values are bad
    (info.path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(VersionUnloadableError, match="non-finite"):
        reg.promote(info.version, "operator")
    assert reg.serving().version is None
    # What a load found finite says so, and the server's checks do not scan it a second time.
    assert reg.load(reg.publish(state(1.0), {}).version)[0].finite and not state(1.0).finite


def test_promote_checks_the_version_under_the_registry_lock(tmp_path: Path) -> None:
    """The version is corrupted while another process holds the lock and promote waits for it:
    a check made before taking the lock would pass and promote the corrupt version."""
    reg = AdapterRegistry(tmp_path)
    info = reg.publish(state(1.0), {})
    errors: list[BaseException] = []

    def promote() -> None:
        try:
            reg.promote(info.version, "operator")
        except RegistryError as exc:
            errors.append(exc)

    with open(tmp_path / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiting = threading.Thread(target=promote)
        waiting.start()
        waiting.join(0.5)  # promote is now waiting for the lock (or checking already: then the test is weaker)
        corrupt(info.path / "adapter_model.safetensors")
        fcntl.flock(lock, fcntl.LOCK_UN)
    waiting.join(30)
    assert [type(e) for e in errors] == [VersionUnloadableError]
    assert reg.serving().version is None


def test_nonfinite_keys_names_every_culprit_and_passes_finite_values_whose_sum_overflows() -> None:
    from dynft.registry import nonfinite_keys

    big = torch.full((4,), 3e38)  # finite, but the sum of all values is past the float range
    assert nonfinite_keys({"a": big, "b": torch.ones(3), "steps": torch.tensor([7])}) == []
    bad = {
        "a": big,
        "nan": torch.tensor([1.0, float("nan")]),
        "inf": torch.tensor([-float("inf")]),
        "ok": torch.ones(2),
    }
    assert nonfinite_keys(bad) == ["nan", "inf"]
    assert nonfinite_keys({"half": torch.tensor([1.0, float("inf")], dtype=torch.bfloat16), "b": torch.ones(2)}) == [
        "half"
    ]


@pytest.mark.parametrize(
    "content",
    [
        b"{garbage",
        b"",
        b"\x00" * 300,
        b'{"version": "abc", "history": 5}',
        b"[1]",
        b'{"version": true}',
        b"\xff\xfe{}",
        b"[" * 100_000,
    ],
    ids=["garbage", "empty", "nuls", "wrong-types", "a-list", "bool-version", "not-utf8", "too-deep"],
)
def test_a_damaged_serving_pointer_is_a_state_error_naming_the_file(tmp_path: Path, content: bytes) -> None:
    """Found by a review: garbage, NULs after a power loss or fields of the wrong type restarted the
    trainer for ever (exit 1), or raised ValueError/TypeError far from the file. It is exit 2 now
    (the supervisor stops), naming the file and what to do."""
    registry = AdapterRegistry(tmp_path)
    (tmp_path / "serving.json").write_bytes(content)
    with pytest.raises(DamagedPointerError, match=r"serving\.json is damaged .*move it aside") as err:
        registry.serving()
    assert exit_code(err.value) == 2


@pytest.mark.parametrize(
    "content", [b"\xff{}", b"[1, 2]", b"[" * 100_000, b"{"], ids=["not-utf8", "a-list", "too-deep", "torn"]
)
def test_a_damaged_meta_json_makes_its_version_unloadable_not_a_crash(tmp_path: Path, content: bytes) -> None:
    """Found by a probe of the CLI: a meta.json (or serving.json) of bytes that are no UTF-8 raised
    UnicodeDecodeError out of the registry (`dynft adapters list` printed a traceback)."""
    registry = AdapterRegistry(tmp_path)
    info = registry.publish(AdapterState({"w": torch.ones(2)}, ["a"], {"peft_type": "LORA"}), {"step": 1})
    (info.path / "meta.json").write_bytes(content)
    with pytest.raises(VersionUnloadableError, match=f"adapter version {info.version}: .*meta.json"):
        registry.meta(info.version)


def test_version_numbers_are_never_reused_after_versions_are_deleted_by_hand(tmp_path: Path) -> None:
    """Found by a review: deleting the versions directory restarted numbering at 1 while the
    pointer's history still named the old 1, 2, 3 (a rollback would have named another model)."""
    registry = AdapterRegistry(tmp_path)
    state = AdapterState({"w": torch.ones(2)}, ["a"], {"peft_type": "LORA"})
    for _ in range(3):
        registry.publish(state, {"step": 1})
    registry.promote(2, "first")
    registry.promote(3, "second")
    for version in (1, 2, 3):
        shutil.rmtree(registry.path(version))
    assert registry.publish(state, {"step": 2}).version == 4


@pytest.mark.parametrize("deleted", ["versions", ".staging", "."])
def test_a_registry_folder_deleted_while_it_runs_is_made_again_and_numbers_go_on(tmp_path: Path, deleted: str) -> None:
    """Found by a probe: after `rm -rf registry/.staging` (or versions/, or a task's whole folder)
    every publish failed until a restart, the restart numbered from 1 again, and listing the
    versions raised FileNotFoundError (a 500 on /v1/adapters and /v1/status)."""
    registry = AdapterRegistry(tmp_path / "registry")
    first = registry.publish(state(), {"parent": None}).version
    second = registry.publish(state(), {"parent": first}).version
    shutil.rmtree(tmp_path / "registry" / deleted)
    if deleted != ".staging":
        assert registry.versions() == []  # gone: none listed, not an error
    third = registry.publish(state(), {"parent": second}).version
    assert third == second + 1  # above its parent: a number is never used twice
    assert registry.load(third)[0].labels == ["a", "b"]
    assert (tmp_path / "registry" / ".staging").is_dir()


def test_a_version_holding_another_versions_files_is_a_mismatch(tmp_path: Path) -> None:
    """Found by a probe: version 374's files re-sent under version 9000 (a forged record on the
    versions topic) were served as 9000, and /v1/adapters listed 374 twice."""
    from dynft.errors import AdapterMismatchError

    reg = AdapterRegistry(tmp_path)
    first = reg.publish(state(1.0), {"base_model": BASE.fingerprint})
    shutil.copytree(first.path, first.path.with_name("000009"))
    with pytest.raises(AdapterMismatchError, match=r"its meta\.json is version 1"):
        reg.load(9)
    with pytest.raises(AdapterMismatchError):
        reg.promote(9, "operator", base_model=BASE)
    assert reg.load(first.version)[1]["version"] == 1
