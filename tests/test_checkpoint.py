from __future__ import annotations

import shutil
from pathlib import Path

import torch

from dynft.checkpoint import Checkpoint, CheckpointStore
from dynft.events import Event
from dynft.ledger import Ledger
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
