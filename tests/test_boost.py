"""While a drift reaction boosts, its extra replay steps run only when no fresh work waits."""

from __future__ import annotations

from test_task_random import forked_task

from dynft.drift import Detection
from dynft.events import Event
from dynft.settings import Settings
from dynft.trainer import build_trainer

from helpers import keyword_events


def test_boosted_extra_replay_steps_give_way_to_waiting_fresh_work(tiny_settings: Settings) -> None:
    home = build_trainer(tiny_settings.model, tiny_settings.adapter, tiny_settings.trainer)
    task = forked_task("a", home, tiny_settings)
    trainer = task.trainer
    rows = keyword_events(64, ["alpha", "beta"], seed=1)
    batches = [[Event.from_builtins(r) for r in rows[i : i + 16]] for i in range(0, 64, 16)]
    task.train(task.collator(batches[0], n_fresh=16))  # something to replay
    task.reaction.on_detection(Detection("error", "ADWIN", 16))
    assert task.reaction.boosting and tiny_settings.drift.boost_extra_steps == 1

    waiting = [True]
    task.publisher.waiting = lambda: waiting[0]
    steps = trainer.steps
    task.train(task.collator(batches[1], n_fresh=16))
    assert trainer.steps == steps + 1  # behind the stream: the fresh step only

    waiting[0] = False
    task.train(task.collator(batches[2], n_fresh=16))
    assert trainer.steps == steps + 1 + 2  # idle otherwise: the fresh step and one of replay
