"""A task's steps draw their dropout masks from its own generator (``dynft.tasks.TaskRandom``)."""

from __future__ import annotations

from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from dynft.batching import LabelMap
from dynft.buffer import ReplayBuffer
from dynft.events import Event
from dynft.metrics import TrainerMetrics
from dynft.settings import Settings
from dynft.tasks import Task, TaskRandom, task_collator
from dynft.trainer import OnlineTrainer, build_trainer

from helpers import keyword_events


def events(n: int, labels: list[str], seed: int, prefix: str) -> list[Event]:
    return [Event.from_builtins(row) for row in keyword_events(n, labels, seed=seed, prefix=prefix)]


def forked_task(name: str, home: OnlineTrainer, settings: Settings, share_adapter: bool = False) -> Task:
    """Task ``name`` forked from ``home``, with a buffer and metrics of its own."""
    trainer = home.fork(task_collator(home.collator, LabelMap()), share_adapter=share_adapter)
    buffer = ReplayBuffer(settings.buffer.max_events, settings.buffer.max_bytes)
    return Task(name, trainer, buffer, settings, home=home, metrics=TrainerMetrics(CollectorRegistry()))


def two_tasks(settings: Settings, state: Path) -> tuple[Task, Task]:
    """Tasks ``a`` and ``b`` forked from a freshly built trainer (the same initial weights every time)."""
    settings = settings.model_copy(update={"state_dir": state})
    home = build_trainer(settings.model, settings.adapter, settings.trainer)
    tasks = []
    for name in ("a", "b"):
        tasks.append(forked_task(name, home, settings))
    home.activate()
    return tasks[0], tasks[1]


def weights(task: Task) -> dict[str, torch.Tensor]:
    with task.installed():
        return {k: t.clone() for k, t in task.trainer.export().tensors.items()}


def test_a_task_trains_the_same_whatever_other_tasks_step_between_its_steps(
    tiny_settings: Settings, tmp_path: Path
) -> None:
    """Dropout is on (LoRA's and the model's): with one generator for the process, task b's step
    between task a's would change a's masks, and so a's weights."""
    assert tiny_settings.adapter.dropout > 0
    first, second = events(16, ["alpha", "beta"], 1, "x"), events(16, ["alpha", "beta"], 2, "y")
    other = events(16, ["gamma", "delta"], 3, "z")

    alone, _ = two_tasks(tiny_settings, tmp_path / "alone")
    for batch in (first, second):
        alone.train(alone.collator(batch, n_fresh=len(batch)))

    a, b = two_tasks(tiny_settings, tmp_path / "beside")
    a.train(a.collator(first, n_fresh=len(first)))
    torch.rand(7)  # the process's generator moves on too (anything else that draws from it)
    b.train(b.collator(other, n_fresh=len(other)))
    a.train(a.collator(second, n_fresh=len(second)))

    expected, got = weights(alone), weights(a)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert not all(torch.equal(t, weights(b).get(k, t)) for k, t in got.items())  # b learned something else


def test_a_tasks_generator_leaves_the_process_generator_where_it_was() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    random = TaskRandom(0, "intents")
    with random.installed():
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)
    with TaskRandom(0, "intents").installed():
        assert torch.equal(torch.rand(3), inside)  # seeded by the trainer's seed and the name
    with TaskRandom(0, "topic").installed():
        assert not torch.equal(torch.rand(3), inside)
    with random.installed():  # and it goes on where it stopped
        assert not torch.equal(torch.rand(3), inside)


def test_a_tasks_generator_resumes_from_the_checkpoint(tiny_settings: Settings, tmp_path: Path) -> None:
    """A restart draws the masks the run would have drawn next, wherever the new process's
    generator stands."""
    first = events(16, ["alpha", "beta"], 1, "x")
    a, _ = two_tasks(tiny_settings, tmp_path / "run")
    a.train(a.collator(first, n_fresh=len(first)))
    assert a.random is not None
    at_snapshot = a.random.state.clone()
    saved = a.snapshot()
    assert torch.equal(saved[0]["task.a.rng.torch"], at_snapshot)

    again, _ = two_tasks(tiny_settings, tmp_path / "again")
    torch.rand(11)  # a new process's generator is anywhere
    process = torch.get_rng_state()
    again.restore(*saved)
    assert again.random is not None and torch.equal(again.random.state, at_snapshot)
    assert torch.equal(torch.get_rng_state(), process)  # the process's own is left alone
    with a.own_random(), torch.no_grad():
        expected = torch.rand(5)
    with again.own_random(), torch.no_grad():
        assert torch.equal(torch.rand(5), expected)


def test_tasks_that_share_one_adapter_draw_from_the_process_generator(tiny_settings: Settings) -> None:
    home = build_trainer(tiny_settings.model, tiny_settings.adapter, tiny_settings.trainer)
    task = forked_task("a", home, tiny_settings, share_adapter=True)
    assert task.random is None
    tensors, _, _ = task.snapshot()
    assert "task.a.rng.torch" not in tensors  # the default task's part of the checkpoint holds it
