from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

from dynft.checkpoint import Checkpoint, CheckpointStore
from dynft.errors import StateCorruptError, exit_code
from dynft.events import Event
from dynft.ledger import Ledger
from dynft.loopstate import STATE_PARTS, restorable
from dynft.settings import Settings
from dynft.trainer import OnlineTrainer, build_trainer

from helpers import keyword_events


def test_only_complete_checkpoints_are_used_and_old_ones_pruned(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    for i in range(4):
        store.save(Checkpoint({"w": torch.full((2,), float(i))}, {"i": i}))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt-")) == [
        "ckpt-000000003",
        "ckpt-000000004",
    ]
    # A crash mid-write leaves staging behind; a lying disk leaves a newest checkpoint that does not load.
    (tmp_path / ".staging" / "torn").mkdir(parents=True)
    (tmp_path / "ckpt-000000004" / "tensors.safetensors").write_bytes(b"garbage")
    latest = store.latest()
    assert latest is not None and latest.state == {"i": 2}
    assert not (tmp_path / ".staging").exists()


@pytest.mark.parametrize(
    "damage",
    [
        "buffer-deleted",
        "buffer-truncated",
        "state-empty-object",
        "state-a-list",
        "buffer-line-not-an-event",
        "tensor-values-changed",
        "state-value-changed",
    ],
)
def test_a_checkpoint_with_a_file_missing_cut_or_of_the_wrong_shape_gives_way_to_the_older_one(
    tmp_path: Path, damage: str
) -> None:
    """Found by a review: a deleted buffer.jsonl was restored as an empty buffer without a word, and
    a state.json of ``{}`` or ``[1]`` (or a buffer line of another shape) failed every restart."""
    store = CheckpointStore(tmp_path, keep=2)
    full = {name: {} for name in STATE_PARTS}
    rows = [{"seq": i, "event": {"id": str(i), "text": "w1", "label": "a"}} for i in range(3)]
    for i in range(2):
        store.save(Checkpoint({"w": torch.ones(1)}, {**full, "i": i}, {"buffer.jsonl": rows, "holdout.jsonl": []}))
    newest = tmp_path / "ckpt-000000002"
    if damage == "buffer-deleted":
        (newest / "buffer.jsonl").unlink()
    elif damage == "buffer-truncated":  # cut at a line's end: every line left still parses
        data = (newest / "buffer.jsonl").read_bytes()
        (newest / "buffer.jsonl").write_bytes(data[: data.index(b"\n") + 1])
    elif damage == "state-empty-object":
        (newest / "state.json").write_text("{}")
    elif damage == "state-a-list":
        (newest / "state.json").write_text("[1]")
    elif damage == "tensor-values-changed":  # a probe's: the shape still fits, the values are garbage
        data = bytearray((newest / "tensors.safetensors").read_bytes())
        data[-4:] = b"\xff\xff\xff\xff"
        (newest / "tensors.safetensors").write_bytes(bytes(data))
    elif damage == "state-value-changed":  # still a whole state of the right shape
        (newest / "state.json").write_text((newest / "state.json").read_text().replace('"i": 1', '"i": 7'))
    else:  # a checkpoint of before manifests: only the check on its contents can tell
        (newest / "manifest.json").unlink()
        (newest / "buffer.jsonl").write_text('{"a": 1}\n' * 3)
    latest = store.latest(check=restorable)
    assert latest is not None and latest.state["i"] == 0 and len(latest.records["buffer.jsonl"]) == 3


def test_no_checkpoint_means_none(tmp_path: Path) -> None:
    assert CheckpointStore(tmp_path / "nothing").latest() is None


def steps(trainer: OnlineTrainer, events: list[Event]) -> list[float]:
    return [trainer.step(trainer.collator(events[i : i + 16], n_fresh=16)).loss for i in range(0, len(events), 16)]


def test_a_restored_trainer_continues_exactly_where_it_stopped(tiny_settings: Settings, tmp_path: Path) -> None:
    events = [Event(**r) for r in keyword_events(320, ["alpha", "beta", "gamma"], seed=31)]
    a = build_trainer(tiny_settings.model, tiny_settings.adapter, tiny_settings.trainer)
    steps(a, events[:160])
    tensors, state = a.snapshot()
    store = CheckpointStore(tmp_path)
    store.save(Checkpoint(tensors, state))
    loaded = store.latest()
    assert loaded is not None
    b = build_trainer(tiny_settings.model, tiny_settings.adapter, tiny_settings.trainer)
    b.restore(loaded.tensors, loaded.state)
    assert b.exported_labels() == a.exported_labels() and b.steps == a.steps
    # Both trainers share this process's RNG: each continues from the state the checkpoint holds.
    losses_a = steps(a, events[160:])
    torch.set_rng_state(loaded.tensors["rng.torch"])
    losses_b = steps(b, events[160:])
    assert losses_a == losses_b  # same weights, same optimizer moments, same RNG: the same future


def test_ledger_forgets_what_was_not_committed(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.record([("a", "trained")])
    ledger.commit()
    ledger.record([("b", "trained")])
    ledger.discard()
    ledger.close()
    shutil.copy(tmp_path / "ledger.db", tmp_path / "copy.db")
    reopened = Ledger(tmp_path / "ledger.db")
    assert reopened.lookup(["a", "b"]) == {"a": ("trained", 1), "b": ("unseen", 0)}


@pytest.mark.parametrize("content", [b"garbage" * 1000, b"\x00" * 8192], ids=["garbage", "nuls"])
def test_a_ledger_that_is_no_database_is_a_state_error_naming_the_file(tmp_path: Path, content: bytes) -> None:
    """Found by a review: "file is not a database", exit 1, restarted for ever, the file not named."""
    path = tmp_path / "ledger.db"
    path.write_bytes(content)
    with pytest.raises(StateCorruptError, match=r"ledger .*ledger\.db: not a readable SQLite database") as err:
        Ledger(path)
    assert exit_code(err.value) == 2


def damage_pages(path: Path) -> None:
    """Random bytes over pages 3-8 of a ledger, its header left whole (it still opens)."""
    with open(path, "r+b") as fh:
        fh.seek(2 * 4096)
        fh.write(random.Random(5).randbytes(6 * 4096))


def test_a_ledger_with_damaged_pages_is_a_state_error_at_start_not_at_every_checkpoint(tmp_path: Path) -> None:
    """Found by a probe: damaged pages past the header opened without an error, every checkpoint
    then failed ("database disk image is malformed") while the trainer trained on, and it exited 0."""
    path = tmp_path / "ledger.db"
    ledger = Ledger(path)
    ledger.record([(f"event-{i}-" + "x" * 200, "trained") for i in range(2000)])  # some 100 pages
    ledger.commit()
    ledger.close()
    damage_pages(path)
    with pytest.raises(StateCorruptError, match=r"ledger .*ledger\.db: not a readable SQLite database") as err:
        Ledger(path)  # the trainer's start (`dynft ledger`, a reader, does not read the whole file)
    assert exit_code(err.value) == 2


def test_a_directory_where_the_ledger_belongs_is_a_state_error_naming_it(tmp_path: Path) -> None:
    """Found by a probe: "unable to open database file", exit 1 without naming it, and `dynft run`
    restarted the trainer for ever."""
    (tmp_path / "ledger.db").mkdir()
    for create in (True, False):
        with pytest.raises(StateCorruptError, match=r"ledger .*ledger\.db: not a file; move it aside") as err:
            Ledger(tmp_path / "ledger.db", create=create)
        assert exit_code(err.value) == 2
