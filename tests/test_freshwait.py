"""A named task's fresh events wait to fill its share of a step (dynft.freshwait), as a daemon's would."""

from __future__ import annotations

from pathlib import Path

from test_loop import run
from test_tasks import interleaved

from dynft.freshwait import FreshWait
from dynft.ledger import Ledger
from dynft.settings import Settings
from dynft.sources import Record

from helpers import write_jsonl


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def held(n: int, clock: Clock, wait_s: float = 2.0) -> tuple[FreshWait[str], list[Record]]:
    """A wait holding events ``a0..`` of task ``a`` for records 1..n (one record per event)."""
    wait: FreshWait[str] = FreshWait(wait_s, clock)
    records = [Record(b"", "s", k + 1) for k in range(n)]
    wait.taken(records)
    wait.hold("a", [(r, f"a{k}") for k, r in enumerate(records)], arrived=clock())
    return wait, records


def pieces(due: list[tuple[str, list[tuple[Record, str]], float]]) -> list[tuple[str, list[str]]]:
    return [(task, [event for _, event in pairs]) for task, pairs, _ in due]


def test_whole_shares_train_one_step_each_oldest_first_and_the_rest_waits() -> None:
    clock = Clock()
    wait, _ = held(7, clock)
    assert pieces(wait.due(lambda task: 3, flush=False, behind=False)) == [
        ("a", ["a0", "a1", "a2"]),
        ("a", ["a3", "a4", "a5"]),
    ]
    assert len(wait) == 1 and not wait.due(lambda task: 3, flush=False, behind=False)


def test_a_partial_share_trains_when_flushed_or_after_waiting_its_bound() -> None:
    clock = Clock()
    wait, _ = held(2, clock)
    assert wait.patience() == 2.0
    clock.now += 1.5
    assert wait.patience() == 0.5  # a take waits no longer than the oldest event may
    assert not wait.due(lambda task: 8, flush=False, behind=False)
    clock.now += 0.5
    assert wait.patience() == 0.0
    assert pieces(wait.due(lambda task: 8, flush=False, behind=False)) == [("a", ["a0", "a1"])]
    wait, _ = held(2, clock)
    assert pieces(wait.due(lambda task: 8, flush=True, behind=False)) == [("a", ["a0", "a1"])]


def test_behind_the_feed_a_task_gets_everything_in_one_piece() -> None:
    wait, _ = held(7, Clock())
    assert pieces(wait.due(lambda task: 3, flush=False, behind=True)) == [("a", [f"a{k}" for k in range(7)])]


def test_a_waiting_event_holds_back_the_positions_of_every_record_taken_after_it() -> None:
    clock = Clock()
    wait: FreshWait[str] = FreshWait(2.0, clock)
    records = [Record(b"", "s", k) for k in (1, 2, 3, 4)]
    wait.taken(records)
    wait.hold("a", [(records[1], "a1")], arrived=clock())  # records 0, 2 and 3: other outcomes
    wait.hold("b", [(records[3], "b3")], arrived=clock())
    assert [r.next for r in wait.released()] == [1]
    wait.due(lambda task: 1 if task == "a" else 2, flush=False, behind=False)  # a's share is full
    assert [r.next for r in wait.released()] == [2, 3]
    wait.due(lambda task: 2, flush=True, behind=False)
    assert [r.next for r in wait.released()] == [4] and not wait.released()


def test_each_named_task_trains_as_many_steps_as_a_daemon_of_its_own(tiny_settings: Settings, tmp_path: Path) -> None:
    tasks = {"intents": ["gamma", "delta"], "topics": ["omega", "sigma"]}
    rows = interleaved(500, tasks)
    together = run(tiny_settings, write_jsonl(tmp_path / "together.jsonl", rows))
    ledger = Ledger(tiny_settings.state_dir / "ledger.db")
    outcomes = ledger.lookup(row["id"] for row in rows)
    ledger.close()
    assert {status for status, _ in outcomes.values()} <= {"trained", "held_out"}  # every event, once
    assert {seen for _, seen in outcomes.values()} == {1}
    for name in tasks:
        tiny_settings.state_dir = tmp_path / name
        own = [{k: v for k, v in row.items() if k != "task"} for row in rows if row["task"] == name]
        alone = run(tiny_settings, write_jsonl(tmp_path / f"{name}.jsonl", own))
        # Each task trained a take's few events at once before: 171-177 steps against 59.
        steps = together.tasks[name].trainer.steps
        assert abs(steps - alone.trainer.steps) <= 0.15 * alone.trainer.steps, (name, steps, alone.trainer.steps)


def test_a_replay_ratio_that_rounds_to_a_whole_batch_still_trains_every_event(
    tiny_settings: Settings, tmp_path: Path
) -> None:
    tiny_settings.buffer.replay_ratio = 0.99  # 16 x 0.99 rounds to 16: a step kept no room for fresh events
    rows = interleaved(60, {"default": ["alpha", "beta"], "intents": ["gamma", "delta"]})
    loop = run(tiny_settings, write_jsonl(tmp_path / "events.jsonl", rows))  # it stalled: 180 s, then failed
    ledger = Ledger(tiny_settings.state_dir / "ledger.db")
    outcomes = ledger.lookup(row["id"] for row in rows)
    ledger.close()
    assert {status for status, _ in outcomes.values()} <= {"trained", "held_out"}
    assert loop.trainer.steps > 0 and loop.tasks["intents"].trainer.steps > 0
