from __future__ import annotations

import pytest
import torch

from dynft.events import Event
from dynft.settings import Settings
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
    tiny_trainer.lexicon = None  # the adapter's own learning: word counts know keywords from the first events
    stream = events(2400, ["alpha", "beta", "gamma"], seed=1)
    correct = []
    for i in range(0, len(stream), 16):
        chunk = stream[i : i + 16]
        result = tiny_trainer.step(tiny_trainer.collator(chunk, n_fresh=len(chunk)))
        correct += [p == e.label for p, e in zip(result.predictions, chunk, strict=True)]
    assert sum(correct[:160]) / 160 < 0.6
    assert sum(correct[-480:]) / 480 > 0.85
    assert tiny_trainer.steps == 150 and tiny_trainer.skipped == 0


def test_a_snapshot_kept_across_steps_still_holds_the_weights_and_moments_it_was_taken_with(
    tiny_trainer: OnlineTrainer,
) -> None:
    tiny_trainer.step(tiny_trainer.collator(events(16, ["alpha", "beta"]), n_fresh=16))
    tensors, _ = tiny_trainer.snapshot()
    kept = {k: t.clone() for k, t in tensors.items()}
    assert any(k.startswith("optim.") for k in kept) and any(k.startswith("param.") for k in kept)
    for seed in range(3):
        tiny_trainer.step(tiny_trainer.collator(events(16, ["alpha", "beta"], seed=seed + 2), n_fresh=16))
    moved = [k for k, t in tensors.items() if k != "rng.torch" and not torch.equal(t, tiny_trainer.snapshot()[0][k])]
    assert moved, "the steps changed nothing: the comparison below would prove nothing"
    for key, tensor in tensors.items():
        assert torch.equal(tensor, kept[key]), key


def test_a_non_finite_loss_skips_the_step_and_leaves_the_weights_alone(tiny_trainer: OnlineTrainer) -> None:
    tiny_trainer.step(tiny_trainer.collator(events(16, ["alpha", "beta"]), n_fresh=16))
    before = {k: p.detach().clone() for k, p in tiny_trainer.slots.capture().items()}
    # A finite but enormous weight drives the weighted loss to infinity: a real poison input.
    poison = [e.replace(weight=1e308) for e in events(16, ["alpha", "beta"], seed=5)]
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


def test_read_back_returns_what_separate_reads_of_each_result_return() -> None:
    from dynft.readback import read_back

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=g)
    losses = torch.rand(5, generator=g)
    features = torch.randn(5, 3, generator=g)
    loss, norm = torch.tensor(0.25), torch.tensor(float("inf"))
    back = read_back(loss, norm, logits, losses, features)
    assert back.loss == 0.25 and back.grad_norm == float("inf")
    assert back.predictions == logits.argmax(-1).tolist()
    assert back.losses == losses.tolist()
    assert back.features == features.tolist()
    empty = read_back(loss, norm, logits[:0], losses[:0], features[:0])  # a replay-only step
    assert (empty.predictions, empty.losses, empty.features) == ([], [], [])
    assert read_back(loss, norm, logits, losses, None).features is None


def test_a_compiled_step_trains_as_the_eager_one_on_length_buckets(tiny_settings: Settings) -> None:
    """``trainer.compile`` (here with the aot_eager backend: dynamo's graph capture and AOT
    autograd, as on a GPU, without generating code) gives the eager step's predictions and
    losses, on batches padded to multiples of 16 tokens."""
    from dynft.trainer import build_trainer

    results = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        tiny_settings.trainer.compile = compiled
        tiny_settings.trainer.compile_backend = "aot_eager"
        tiny_settings.trainer.pad_multiple = 16
        trainer = build_trainer(tiny_settings.model, tiny_settings.adapter, tiny_settings.trainer)
        for module in trainer.model.modules():  # no dropout: the two runs see the same arithmetic
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        steps = []
        for seed in range(3):
            batch = trainer.collator(events(16, ["alpha", "beta", "gamma"], seed=seed), n_fresh=16)
            assert batch.input_ids.shape[1] % 16 == 0
            steps.append(trainer.step(batch))
        assert (trainer._compiled is not None) == compiled
        results[compiled] = steps
    for eager, comp in zip(results[False], results[True], strict=True):
        assert comp.predictions == eager.predictions and comp.skipped is None
        assert comp.loss == pytest.approx(eager.loss, rel=1e-4, abs=1e-5)


def test_an_unknown_compile_backend_is_a_configuration_error(tiny_settings: Settings) -> None:
    from dynft.errors import ConfigError
    from dynft.trainer import build_trainer

    tiny_settings.trainer.compile = True
    tiny_settings.trainer.compile_backend = "no-such-backend"
    with pytest.raises(ConfigError, match=r"trainer\.compile_backend 'no-such-backend'"):
        build_trainer(tiny_settings.model, tiny_settings.adapter, tiny_settings.trainer)


@pytest.mark.parametrize("side", ["right", "left"])
def test_length_buckets_never_pad_past_max_length(tiny_trainer: OnlineTrainer, side: str) -> None:
    """Rounding up to a multiple of 16 stops at ``max_length`` (20 here, not a multiple): a model
    whose positions end there must never see position 32; every text keeps all its tokens."""
    from dynft.batching import tokenize

    tokenizer = tiny_trainer.collator.tokenizer
    texts = ["alpha " * 40, "beta gamma"]
    before = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        plain, bucketed = tokenize(tokenizer, texts, 20), tokenize(tokenizer, texts, 20, 16)
        short = tokenize(tokenizer, texts[1:], 20, 16)
    finally:
        tokenizer.padding_side = before
    assert plain["input_ids"].shape[1] == bucketed["input_ids"].shape[1] == 20
    assert torch.equal(plain["attention_mask"].sum(dim=1), bucketed["attention_mask"].sum(dim=1))
    assert short["input_ids"].shape[1] == 16 and int(short["attention_mask"].sum()) < 16  # a bucket under the limit
