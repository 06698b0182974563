from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynft.errors import RegistryError
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
