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


@pytest.mark.slow
def test_a_task_watches_its_own_inputs_through_the_token_embeddings(tiny_settings: Settings, tmp_path: Path) -> None:
    """A task's representation detector gets its steps' token embeddings (the default task's does
    too): reviews turning into tweets in the task's stream are seen there, not in the default task."""
    from test_drift import review_like, tweet_like

    rng = random.Random(3)
    texts = review_like(rng, 400) + tweet_like(rng, 200)
    task = [{"id": f"t{i}", "text": t, "label": ["pos", "neg"][i % 2], "task": "reviews"} for i, t in enumerate(texts)]
    default = [{**row} for row in keyword_events(600, ["delta", "omega"], seed=6, prefix="d")]
    rows = [row for pair in zip(task, default, strict=True) for row in pair]
    tiny_settings.drift.reactions = []
    tiny_settings.trainer.freshest_first_backlog = 0  # every event trained, in order, and none held out:
    tiny_settings.evaluation.holdout_fraction = 0.0  # a detection's index is its row's in the task's stream
    loop = run(tiny_settings, write_jsonl(tmp_path / "shift.jsonl", rows), CollectorRegistry())

    assert "representation" in loop.tasks["reviews"].drift.streams
    seen = [d.index for d in loop.tasks["reviews"].drift.history if d.stream == "representation"]
    assert seen and 400 <= seen[0] < 500, seen
    assert not [d for d in loop.drift.history if d.stream == "representation"]
