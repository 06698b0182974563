from __future__ import annotations

import torch

from dynft.events import Event
from dynft.trainer import OnlineTrainer

from helpers import keyword_events


def events(n: int, labels: list[str], seed: int = 0, **kw: object) -> list[Event]:
    return [Event(**r) for r in keyword_events(n, labels, seed=seed, **kw)]  # type: ignore[arg-type]


def test_prequential_predictions_come_before_the_update(tiny_trainer: OnlineTrainer) -> None:
    batch_events = events(16, ["alpha", "beta"])
    tiny_trainer.step(tiny_trainer.collator(batch_events, n_fresh=16))  # labels and head exist now
    for module in tiny_trainer.model.modules():  # no dropout, so train-mode logits equal eval-mode ones
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batch = tiny_trainer.collator(batch_events, n_fresh=16)

    def eval_logits() -> torch.Tensor:
        tiny_trainer.model.eval()
        with torch.no_grad():
            return tiny_trainer.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    before = eval_logits()
    result = tiny_trainer.step(batch)
    labels = tiny_trainer.exported_labels()
    assert result.predictions == [labels[i] for i in before.argmax(-1).tolist()]
    assert not torch.allclose(eval_logits(), before)  # the update came after the predictions


def test_the_trainer_learns_the_keyword_task(tiny_trainer: OnlineTrainer) -> None:
    stream = events(2400, ["alpha", "beta", "gamma"], seed=1)
    correct = []
    for i in range(0, len(stream), 16):
        chunk = stream[i : i + 16]
        result = tiny_trainer.step(tiny_trainer.collator(chunk, n_fresh=len(chunk)))
        correct += [p == e.label for p, e in zip(result.predictions, chunk, strict=True)]
    assert sum(correct[:160]) / 160 < 0.6
    assert sum(correct[-480:]) / 480 > 0.85
    assert tiny_trainer.steps == 150 and tiny_trainer.skipped == 0


def test_a_non_finite_loss_skips_the_step_and_leaves_the_weights_alone(tiny_trainer: OnlineTrainer) -> None:
    tiny_trainer.step(tiny_trainer.collator(events(16, ["alpha", "beta"]), n_fresh=16))
    before = {k: p.detach().clone() for k, p in tiny_trainer.slots.capture().items()}
    # A finite but enormous weight drives the weighted loss to infinity: a real poison input.
    poison = [e.model_copy(update={"weight": 1e308}) for e in events(16, ["alpha", "beta"], seed=5)]
    result = tiny_trainer.step(tiny_trainer.collator(poison, n_fresh=16))
    assert result.skipped == "non_finite_loss"
    assert tiny_trainer.skipped == 1 and tiny_trainer.steps == 1
    for key, param in tiny_trainer.slots.capture().items():
        assert torch.equal(param.detach(), before[key])
    assert tiny_trainer.all_finite()


def test_new_labels_grow_the_head_mid_stream_and_old_ones_keep_working(tiny_trainer: OnlineTrainer) -> None:
    probe = events(200, ["alpha", "beta"], seed=999, prefix="probe")

    def old_accuracy() -> float:
        predicted = tiny_trainer.predict(probe, tiny_trainer.exported_labels())
        return sum(p == e.label for p, e in zip(predicted, probe, strict=True)) / len(probe)

    for start in range(0, 960, 16):
        tiny_trainer.step(tiny_trainer.collator(events(16, ["alpha", "beta"], seed=start), n_fresh=16))
    assert old_accuracy() > 0.85
    for start in range(0, 480, 16):
        tiny_trainer.step(
            tiny_trainer.collator(events(16, ["alpha", "beta", "gamma"], seed=10_000 + start), n_fresh=16)
        )
    labels = tiny_trainer.exported_labels()
    assert sorted(labels) == ["alpha", "beta", "gamma"] and labels.index("gamma") == 2  # appended, ids stable
    assert old_accuracy() > 0.85


def test_reset_adapter_starts_a_fresh_lineage(tiny_trainer: OnlineTrainer) -> None:
    initial = {
        k: p.detach().clone() for k, p in tiny_trainer.slots.capture().items() if k not in tiny_trainer.slots.head_keys
    }
    for i in range(0, 160, 16):
        tiny_trainer.step(tiny_trainer.collator(events(16, ["alpha", "beta"], seed=i), n_fresh=16))
    tiny_trainer.reset_adapter()
    for key, param in tiny_trainer.slots.capture().items():
        if key in initial:
            assert torch.equal(param.detach(), initial[key])
    assert not tiny_trainer.optimizer.state
