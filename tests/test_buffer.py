from __future__ import annotations

from collections import Counter

import pytest

from dynft.buffer import INDEXED_LABELS, ReplayBuffer
from dynft.events import Event


def ev(i: int, label: str, text: str = "some text") -> Event:
    return Event(id=str(i), text=text, label=label)


@pytest.mark.parametrize("strategy", ["reservoir", "class_balanced", "recency"])
def test_bounded_by_count(strategy: str) -> None:
    buf = ReplayBuffer(max_events=50, max_bytes=1 << 20, strategy=strategy, seed=1)  # type: ignore[arg-type]
    for i in range(1000):
        buf.add(ev(i, "abc"[i % 3]))
    assert len(buf) == 50
    assert buf.seen == 1000
    assert buf.nbytes == sum(e.nbytes for e in buf.events())


@pytest.mark.parametrize("strategy", ["reservoir", "class_balanced", "recency"])
def test_bounded_by_bytes(strategy: str) -> None:
    big = "x" * 1000
    buf = ReplayBuffer(max_events=10_000, max_bytes=20_000, strategy=strategy, seed=1)  # type: ignore[arg-type]
    for i in range(200):
        buf.add(ev(i, "ab"[i % 2], big))
    assert buf.nbytes <= 20_000
    assert len(buf) == 20_000 // ev(0, "a", big).nbytes


def test_an_event_larger_than_the_buffer_is_not_kept() -> None:
    buf = ReplayBuffer(max_events=10, max_bytes=1024)
    assert not buf.add(ev(0, "a", "y" * 5000))
    assert len(buf) == 0


def test_recency_keeps_the_newest_and_prefers_them() -> None:
    buf = ReplayBuffer(max_events=100, max_bytes=1 << 20, strategy="recency", recency_half_life=10, seed=3)
    for i in range(300):
        buf.add(ev(i, "a"))
    assert sorted(int(e.id) for e in buf.events()) == list(range(200, 300))
    drawn = [int(e.id) for e in buf.sample(2000)]
    assert sum(i >= 290 for i in drawn) > sum(i < 210 for i in drawn) * 20


def test_class_balanced_keeps_and_samples_minority_classes() -> None:
    buf = ReplayBuffer(max_events=60, max_bytes=1 << 20, strategy="class_balanced", seed=2)
    for i in range(1000):
        buf.add(ev(i, "rare" if i % 50 == 0 else "common"))
    counts = buf.label_counts()
    assert counts["rare"] == 20  # all 20 rare events survive: eviction hits the largest class
    drawn = Counter(e.label for e in buf.sample(4000))
    assert 0.4 < drawn["rare"] / 4000 < 0.6


@pytest.mark.parametrize("spread", [10, 300])  # few labels: a scan; many: an index of labels by size
def test_class_balanced_evicts_from_a_largest_class(spread: int) -> None:
    """Every eviction takes an event of a largest class, also after retiring, clearing and resizing."""
    import random

    rng = random.Random(7)
    buf = ReplayBuffer(max_events=200, max_bytes=1 << 20, strategy="class_balanced", seed=3)
    for i in range(6000):
        if i == 2000:
            buf.retire_before(1500)
        if i == 3000:
            buf.resize(120, 1 << 20)
        if i == 4000:
            buf.clear()
        before = buf.label_counts()
        label = f"l{min(int(rng.expovariate(0.05)), spread)}"  # a skewed stream
        buf.add(ev(i, label))
        after = buf.label_counts()
        offered = before + Counter({label: 1})
        lost = offered - after
        if lost:
            (victim,) = lost
            assert offered[victim] == max(offered.values())
        assert len(buf) == sum(after.values()) <= buf.max_events
    assert (len(buf.label_counts()) > INDEXED_LABELS) == (spread > 100)


def test_reservoir_is_a_uniform_sample_of_the_whole_stream() -> None:
    kept_early = 0
    for seed in range(20):
        buf = ReplayBuffer(max_events=100, max_bytes=1 << 20, strategy="reservoir", seed=seed)
        for i in range(1000):
            buf.add(ev(i, "a"))
        kept_early += sum(int(e.id) < 500 for e in buf.events())
    assert 0.4 < kept_early / (20 * 100) < 0.6  # half the stream, half the reservoir


def test_new_labels_can_appear_any_time() -> None:
    buf = ReplayBuffer(max_events=30, max_bytes=1 << 20, strategy="class_balanced", seed=0)
    for i in range(100):
        buf.add(ev(i, "a"))
    buf.add(ev(100, "new"))
    assert buf.label_counts()["new"] == 1
    assert any(e.label == "new" for e in buf.sample(200))


def test_recent_share_draws_from_events_after_a_point() -> None:
    buf = ReplayBuffer(max_events=1000, max_bytes=1 << 20, strategy="reservoir", seed=0)
    for i in range(500):
        buf.add(ev(i, "a"))
    since = buf.seen
    for i in range(500, 510):
        buf.add(ev(i, "a"))
    drawn = [int(e.id) for e in buf.sample(100, recent_since=since, recent_share=0.5)]
    assert sum(i >= 500 for i in drawn) >= 50


def test_empty_buffer_samples_nothing() -> None:
    assert ReplayBuffer(10, 1 << 20).sample(5) == []
