"""Each task reacts to its own drift, shares the replay budget, and counts toward checkpoints."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from test_loop import run, sample

from dynft.settings import Settings

from helpers import keyword_events, write_jsonl


@pytest.mark.slow
def test_a_concept_change_in_one_task_is_reacted_to_by_that_task_alone(tiny_settings: Settings, tmp_path: Path) -> None:
    labels, flip = ["alpha", "beta", "gamma"], 1200
    permuted = {"alpha": "beta", "beta": "gamma", "gamma": "alpha"}
    intents = keyword_events(flip, labels, seed=4, prefix="i") + keyword_events(
        800, labels, seed=5, prefix="i", start=flip, relabel=permuted
    )
    default = keyword_events(1000, ["delta", "omega"], seed=6, prefix="d")
    rows, rng = [], random.Random(0)
    pending = [[{**row, "task": "intents"} for row in intents], default]
    while any(pending):  # interleaved, each stream in its own order
        stream = rng.choice([p for p in pending if p])
        rows.append(stream.pop(0))
    tiny_settings.buffer.max_events = 400
    metrics = CollectorRegistry()
    loop = run(tiny_settings, write_jsonl(tmp_path / "drift.jsonl", rows), metrics)

    task = loop.tasks["intents"]
    assert sample(metrics, "dynft_drift_reactions_total", reaction="retire") == 1
    assert task.reaction.lineage == 2 and task.publisher.lineage == 2
    assert loop.reaction.lineage == 1 and loop.publisher.lineage == 1  # the default task kept its concept
    kept = [int(e.id[1:]) for e in task.buffer.events()]
    assert kept and min(kept) >= flip, "replayed events of the old concept survived"
    assert task.prequential.accuracy > 0.6, "the permuted concept was learned (chance is 1/3)"
    # Two tasks share the replay budget evenly.
    assert task.buffer.max_events == loop.buffer.max_events == 200
    assert len(task.buffer) + len(loop.buffer) <= 400


def test_steps_of_every_task_count_toward_the_checkpoint_cadence(tiny_settings: Settings, tmp_path: Path) -> None:
    rows = [{**row, "task": "intents"} for row in keyword_events(640, ["alpha", "beta"], seed=2)]
    tiny_settings.checkpoint.every_steps = 10
    tiny_settings.checkpoint.interval_s = 3600.0
    metrics = CollectorRegistry()
    loop = run(tiny_settings, write_jsonl(tmp_path / "intents.jsonl", rows), metrics)

    assert loop.trainer.steps == 0 and loop.tasks["intents"].trainer.steps >= 30
    assert sample(metrics, "dynft_checkpoints_total") >= 3  # due by steps, not only the one at shutdown
