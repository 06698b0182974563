"""Many tasks on one base model (dynft.tasks): per-task heads, versions, caps and resume."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from test_loop import run, sample

from dynft.checkpoint import CheckpointStore
from dynft.deadletter import read_dead_letters
from dynft.events import Event
from dynft.loop import TrainingLoop
from dynft.registry import AdapterRegistry
from dynft.settings import Settings
from dynft.tasks import task_registry_dir

from helpers import keyword_events, write_jsonl

TASKS = {"default": ["alpha", "beta"], "intents": ["gamma", "delta"], "topics": ["omega", "sigma"]}


def interleaved(n_per_task: int, tasks: dict[str, list[str]], seed: int = 0, start: int = 0) -> list[dict[str, Any]]:
    """``n_per_task`` keyword events of each task, shuffled together; ``default`` events name no task."""
    rows = []
    for k, (task, labels) in enumerate(tasks.items()):
        for row in keyword_events(n_per_task, labels, seed=seed + k, prefix=f"{task}-", start=start):
            rows.append(row if task == "default" else {**row, "task": task})
    random.Random(seed).shuffle(rows)
    return rows


def final_accuracy(loop: TrainingLoop, name: str, labels: list[str], n: int = 200) -> float:
    """How well task ``name``'s trained weights label new events of its own, unlike its prequential
    accuracy, which counts its early errors too."""
    events = [Event.from_builtins(r) for r in keyword_events(n, labels, seed=99, prefix=f"{name}-new-", start=90_000)]
    task = loop.tasks[name]
    with task.installed():
        predictions = task.trainer.predictions(events)
    return sum(p == e.label for p, e in zip(predictions, events, strict=True)) / n


def test_three_interleaved_tasks_train_three_heads_with_their_own_versions(
    tiny_settings: Settings, tmp_path: Path
) -> None:
    tiny_settings.registry.keep_last = 100
    # A named task's step trains a whole fresh share, as a daemon of its own would (dynft.freshwait):
    # about 56 steps for 500 events at 16 rows, after which the tiny model sometimes still answers
    # one task at chance (seen once in six runs); 8 rows make twice the steps.
    tiny_settings.trainer.batch_size = 8
    metrics = CollectorRegistry()
    loop = run(tiny_settings, write_jsonl(tmp_path / "tasks.jsonl", interleaved(500, TASKS)), metrics)

    assert sorted(loop.tasks) == ["intents", "topics"]
    assert loop.prequential.accuracy > 0.8
    for name, labels in TASKS.items():
        registry = AdapterRegistry(task_registry_dir(tiny_settings.registry_dir, name))
        versions = registry.versions()
        assert versions, name
        serving = registry.serving().version
        assert serving is not None
        state, meta = registry.load(serving)
        assert sorted(state.labels) == sorted(labels), name  # each head knows its own task's labels only
        if name != "default":
            task = loop.tasks[name]
            assert meta["task"] == name
            assert task.prequential.accuracy > 0.5, (name, task.prequential.accuracy)  # chance is 0.5; 0.57-0.75 seen
            assert final_accuracy(loop, name, labels) > 0.85  # 0.94-0.98 seen
            assert task.trainer.steps > 10
            assert sorted(task.trainer.label_map.labels) == sorted(labels)
    assert sorted(loop.trainer.label_map.labels) == ["alpha", "beta"]
    snapshot = loop.history.snapshot  # what the console shows, written at the last status
    assert snapshot.tasks == ["default", "intents", "topics"]
    for stat in snapshot.task_stats:
        registry = AdapterRegistry(task_registry_dir(tiny_settings.registry_dir, stat.task))
        pq = loop.prequential if stat.task == "default" else loop.tasks[stat.task].prequential
        assert (stat.events, stat.accuracy) == (pq.seen, pq.accuracy) and stat.events > 0
        assert (stat.serving, stat.latest) == (registry.serving().version, max(registry.versions()))
    trained = sample(metrics, "dynft_events_total", outcome="trained")
    others = sum(sample(metrics, "dynft_events_total", outcome=o) for o in ("held_out", "buffered", "skipped"))
    assert trained + others == 3 * 500
    # Every per-task family has a series per task, the default one included (a probe found three
    # without it: a dashboard's task selector set to "default" showed empty panels).
    families = ["dynft_task_latest_version", "dynft_task_promoted_version", "dynft_task_drift_detections_total"]
    families += ["dynft_task_prequential_accuracy", "dynft_task_events_trained_total"]
    for family in families:
        for name in TASKS:
            assert metrics.get_sample_value(family, {"task": name}) is not None, (family, name)
    for name in TASKS:
        registry = AdapterRegistry(task_registry_dir(tiny_settings.registry_dir, name))
        assert sample(metrics, "dynft_task_latest_version", task=name) == max(registry.versions()), name


def test_a_task_beyond_the_cap_and_a_bad_task_name_are_dead_lettered(tiny_settings: Settings, tmp_path: Path) -> None:
    tiny_settings.tasks.max_tasks = 2
    rows = interleaved(150, TASKS, seed=3)
    rows.insert(7, {"id": "bad-name", "text": "w1 alpha0", "label": "alpha", "task": "a/b"})
    metrics = CollectorRegistry()
    loop = run(tiny_settings, write_jsonl(tmp_path / "cap.jsonl", rows), metrics)

    letters = read_dead_letters(tiny_settings.dead_letter_path)
    reasons = {entry["reason"] for entry in letters}
    assert reasons == {"too_many_tasks", "invalid_task"}
    assert len(loop.tasks) == 1  # default plus the first other task seen
    capped = next(t for t in ("intents", "topics") if t not in loop.tasks)
    capped_ids = {row["id"] for row in rows if row.get("task") == capped}
    assert {json.loads(e["raw_bytes"])["id"] for e in letters if e["reason"] == "too_many_tasks"} == capped_ids
    assert sample(metrics, "dynft_events_rejected_total", reason="too_many_tasks") == len(capped_ids)
    assert not (tiny_settings.registry_dir / "tasks" / capped).exists()


def test_tasks_of_a_few_events_leave_a_large_task_its_replay(tiny_settings: Settings, tmp_path: Path) -> None:
    """Found by a review: 62 records naming throwaway tasks shrank the default task's replay from
    1,421 events to 156 (even shares). Shares are max-min fair: a task keeps room for what it has
    offered (and as many more, up to a step), the large task the rest."""
    tiny_settings.buffer.max_events = 400
    tiny_settings.tasks.max_tasks = 64
    rows: list[dict[str, Any]] = keyword_events(600, ["alpha", "beta"], seed=8, prefix="d")
    rng = random.Random(8)
    for k in range(30):
        rows.insert(rng.randrange(len(rows)), {"id": f"t{k}", "text": "w1 alpha0", "label": "alpha", "task": f"t{k}"})
    loop = run(tiny_settings, write_jsonl(tmp_path / "many.jsonl", rows))

    assert len(loop.tasks) == 30
    small = [task.buffer for task in loop.tasks.values()]
    assert all(len(buffer) == 1 and buffer.max_events <= 3 for buffer in small)
    assert loop.buffer.max_events >= 400 - 30 * 3 and len(loop.buffer) == loop.buffer.max_events
    assert loop.buffer.max_events + sum(buffer.max_events for buffer in small) == 400


def test_tasks_resume_from_the_checkpoint(tiny_settings: Settings, tmp_path: Path) -> None:
    first = run(tiny_settings, write_jsonl(tmp_path / "a.jsonl", interleaved(300, TASKS, seed=5)))
    steps = {name: task.trainer.steps for name, task in first.tasks.items()}
    weights = {name: task.trainer.export().tensors for name, task in first.tasks.items()}

    second = run(tiny_settings, write_jsonl(tmp_path / "b.jsonl", interleaved(60, TASKS, seed=6, start=1000)))
    for name, task in second.tasks.items():
        assert task.trainer.steps > steps[name]  # continued, not started again
        assert task.prequential.seen > 300 * 0.8
    # Restored weights differ from a fresh adapter's: the first run's learning came back.
    assert set(second.tasks) == set(weights)


def test_a_lower_task_cap_at_a_restart_keeps_every_task_of_the_checkpoint_and_admits_no_new_one(
    tiny_settings: Settings, tmp_path: Path
) -> None:
    """Found by a probe: a restart with tasks.max_tasks lowered dropped the tasks beyond it from the
    checkpoint it then wrote, so they started again from the base model after the cap was raised."""
    first = run(tiny_settings, write_jsonl(tmp_path / "a.jsonl", interleaved(300, TASKS, seed=5)))
    steps = {name: task.trainer.steps for name, task in first.tasks.items()}
    tiny_settings.tasks.max_tasks = 2
    rows = interleaved(40, TASKS, seed=6, start=1000)
    rows += [{"id": "new-1", "text": "w1 alpha0", "label": "alpha", "task": "newcomer"}]
    second = run(tiny_settings, write_jsonl(tmp_path / "b.jsonl", rows))
    assert sorted(second.tasks) == ["intents", "topics"]
    assert all(task.trainer.steps > steps[name] for name, task in second.tasks.items())  # continued
    letters = read_dead_letters(tiny_settings.dead_letter_path)
    assert [(e["reason"], json.loads(e["raw_bytes"])["id"]) for e in letters] == [("too_many_tasks", "new-1")]
    tiny_settings.tasks.max_tasks = 64
    third = run(tiny_settings, write_jsonl(tmp_path / "c.jsonl", interleaved(20, TASKS, seed=7, start=2000)))
    assert all(task.trainer.steps > second.tasks[name].trainer.steps for name, task in third.tasks.items())


def test_a_single_task_state_directory_resumes_as_the_default_task(tiny_settings: Settings, tmp_path: Path) -> None:
    # A stream without tasks writes exactly the state of a single-task daemon: no task parts anywhere.
    first = run(tiny_settings, write_jsonl(tmp_path / "a.jsonl", keyword_events(300, TASKS["default"], seed=9)))
    checkpoint = CheckpointStore(tiny_settings.state_dir / "checkpoints").latest()
    assert checkpoint is not None and "tasks" not in checkpoint.state
    assert not any(k.startswith("task.") for k in checkpoint.tensors)
    assert not (tiny_settings.registry_dir / "tasks").exists()
    steps, serving = first.trainer.steps, AdapterRegistry(tiny_settings.registry_dir).serving().version

    second = run(tiny_settings, write_jsonl(tmp_path / "b.jsonl", interleaved(200, TASKS, seed=10, start=5000)))
    assert second.trainer.steps > steps  # the default task continued from the old checkpoint
    assert sorted(second.trainer.label_map.labels) == ["alpha", "beta"]
    assert sorted(second.tasks) == ["intents", "topics"]  # new tasks start beside it
    registry = AdapterRegistry(tiny_settings.registry_dir)
    assert serving is not None and registry.versions()[-1] > serving  # numbered on from the first run's
    assert registry.meta(registry.versions()[-1])["parent"] is not None  # the old version line goes on


def test_a_stream_of_one_named_task_replays_as_a_default_one(tiny_settings: Settings, tmp_path: Path) -> None:
    rows = keyword_events(500, ["alpha", "beta"], seed=0)
    default = run(tiny_settings, write_jsonl(tmp_path / "default.jsonl", rows))
    tiny_settings.state_dir = tmp_path / "named"  # another daemon: the same events, all of task "x"
    named = run(tiny_settings, write_jsonl(tmp_path / "named.jsonl", [{**row, "task": "x"} for row in rows]))
    # A take leaves room for replay by the lone task's buffer, not the empty default one: without
    # that, task x trained 16 fresh events a step and never replayed (32 steps, not 59). Its steps
    # wait for whole fresh shares (dynft.freshwait), where the default task's take what is queued:
    # 53 against 59 seen.
    assert named.trainer.steps == 0 and abs(named.tasks["x"].trainer.steps - default.trainer.steps) <= 9


def test_the_status_line_names_the_busiest_tasks_and_counts_every_tasks_steps(
    tiny_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by a probe: with 300 tasks the status line ran to 14 KB every few seconds, and the last
    line said "trainer stopped after 0 steps" for a stream of named tasks alone."""
    many = {f"t{k:02d}": ["alpha", "beta"] for k in range(13)}
    rows = []
    for k, (task, labels) in enumerate(many.items()):
        rows += [{**row, "task": task} for row in keyword_events(8 + 10 * k, labels, prefix=task)]
    random.Random(1).shuffle(rows)
    tiny_settings.run.status_interval_s = 0.05
    with caplog.at_level(logging.INFO, logger="dynft.loop"):
        loop = run(tiny_settings, write_jsonl(tmp_path / "many.jsonl", rows))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tasks | ")]
    assert lines
    named = [part.split()[0] for part in lines[-1].removeprefix("tasks | ").split(" | ")[:-1]]
    assert named == [f"t{k:02d}" for k in range(12, 2, -1)], lines[-1]  # the ten with the most events
    assert lines[-1].endswith(" | and 3 more tasks")
    steps = sum(task.trainer.steps for task in loop.tasks.values())
    assert steps > 0 and f"trainer stopped after {steps} steps" in caplog.text
