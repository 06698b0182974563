"""``model.share_base_weights``: the trainer's and the server's frozen base weights are one mapped
file of the state directory; answers and training are unchanged, and a bad file is never trusted."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from dynft.events import Event
from dynft.model import build_model, peft_config_from_settings
from dynft.settings import Settings
from dynft.sharedweights import share_frozen
from dynft.trainer import build_trainer

from helpers import keyword_events

FINGERPRINT = "tiny"


def server_model(settings: Settings, labels: int) -> PeftModel:
    path = Path(str(settings.model.path))
    config = peft_config_from_settings(settings.adapter, path)
    return build_model(path, config, labels, torch.device("cpu"), 0, "cls", settings.model)


def logits(model: PeftModel, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def mappings(path: Path) -> list[tuple[int, int]]:
    """This process's address ranges that map ``path`` (from /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            start, end = line.split()[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def frozen(model: PeftModel) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if not p.requires_grad and "original_module" not in n}


def test_two_processes_models_map_one_file_and_answer_and_train_as_before(
    tiny_settings: Settings, tmp_path: Path
) -> None:
    trainer = build_trainer(tiny_settings.model, tiny_settings.adapter, tiny_settings.trainer)
    server = server_model(tiny_settings, labels=3)
    ids = torch.randint(5, 20, (4, 12))
    before = logits(server, ids)
    shared = share_frozen(trainer.model, tmp_path, FINGERPRINT)
    assert shared == share_frozen(server, tmp_path, FINGERPRINT) > 0  # the head copies (sized by labels) left out
    assert [f.name for f in tmp_path.iterdir()] == [next(tmp_path.iterdir()).name]  # one file for both
    mapped = mappings(next(tmp_path.iterdir()))
    for p in [*frozen(trainer.model).values(), *frozen(server).values()]:  # every frozen weight is in the file
        assert any(start <= p.data_ptr() < end for start, end in mapped)
    assert torch.equal(logits(server, ids), before)

    digest = hashlib.sha256(next(tmp_path.iterdir()).read_bytes()).hexdigest()
    weights = {n: p.clone() for n, p in frozen(trainer.model).items()}
    stream = [Event(**r) for r in keyword_events(64, ["alpha", "beta"], seed=1)]  # type: ignore[arg-type]
    for i in range(0, 64, 16):
        result = trainer.step(trainer.collator(stream[i : i + 16], n_fresh=16))
        assert result.skipped is None
    assert all(torch.equal(p, weights[n]) for n, p in frozen(trainer.model).items())  # the base stays frozen
    assert hashlib.sha256(next(tmp_path.iterdir()).read_bytes()).hexdigest() == digest  # the file is never written


def test_a_file_that_does_not_hold_the_weights_is_written_again_and_never_trusted(
    tiny_settings: Settings, tmp_path: Path
) -> None:
    first = server_model(tiny_settings, labels=2)
    share_frozen(first, tmp_path, FINGERPRINT)
    path = next(tmp_path.iterdir())
    damaged = bytearray(path.read_bytes())
    middle = len(damaged) // 2
    damaged[middle : middle + 100] = b"\xff" * 100
    path.write_bytes(bytes(damaged))  # same size, other weights

    second = server_model(tiny_settings, labels=2)
    ids = torch.randint(5, 20, (2, 8))
    before = logits(second, ids)
    assert share_frozen(second, tmp_path, FINGERPRINT) > 0
    assert torch.equal(logits(second, ids), before)
    assert path.read_bytes() != bytes(damaged)  # rewritten with the real weights


def test_a_directory_that_cannot_be_written_leaves_the_weights_private(
    tiny_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = server_model(tiny_settings, labels=2)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert share_frozen(model, blocker / "run", FINGERPRINT) == 0
    assert "stay private to this process" in caplog.text
    assert not any(mappings(path) for path in tmp_path.rglob("frozen-*"))
