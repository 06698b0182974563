"""Freshness: a first version without waiting for an interval, a new label published at the next
step, and the server observing how long events waited to be served (``dynft_freshness_seconds``)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from prometheus_client import CollectorRegistry
from test_loop import run

from dynft.evaluation import HoldoutWindow
from dynft.events import Event
from dynft.ledger import Ledger
from dynft.loop import TrainingLoop
from dynft.metrics import ServerMetrics, TrainerMetrics
from dynft.publisher import Publisher
from dynft.registry import AdapterRegistry
from dynft.serving.engine import InferenceEngine
from dynft.settings import Settings
from dynft.trainer import OnlineTrainer

from helpers import keyword_events, write_jsonl
from kafka_helpers import wait_until


def events(n: int, labels: list[str], seed: int, prefix: str) -> list[Event]:
    return [Event(**r) for r in keyword_events(n, labels, seed=seed, prefix=prefix)]  # type: ignore[arg-type]


def step(trainer: OnlineTrainer, publisher: Publisher, batch: list[Event], arrived: float) -> int | None:
    """One step as the loop takes it: train, note the arrivals, offer a publish."""
    trainer.step(trainer.collator(batch, n_fresh=len(batch)))
    publisher.arrivals.add(arrived, len(batch))
    return publisher.maybe_publish({})


def make_publisher(settings: Settings, trainer: OnlineTrainer, holdout: HoldoutWindow) -> Publisher:
    settings.registry.publish_interval_s = 3600.0  # only the step triggers under test publish
    registry = AdapterRegistry(settings.registry_dir)
    return Publisher(registry, trainer, holdout, settings, TrainerMetrics(CollectorRegistry()))


def test_a_first_version_is_published_after_first_publish_steps_and_carries_its_arrivals(
    tiny_settings: Settings, tiny_trainer: OnlineTrainer
) -> None:
    tiny_settings.registry.first_publish_steps = 3
    publisher = make_publisher(tiny_settings, tiny_trainer, HoldoutWindow(64))
    stream = events(48, ["alpha", "beta"], seed=1, prefix="a")
    published = [step(tiny_trainer, publisher, stream[i : i + 16], 1000.0 + i) for i in range(0, 48, 16)]
    assert published[:2] == [None, None] and published[2] == 1  # at step 3, not at publish_every_steps (20)
    meta = publisher.registry.meta(1)
    assert meta["gate"]["decision"] == "promoted" and publisher.registry.serving().version == 1
    assert meta["arrivals"] == [[1000.0, 16], [1016.0, 16], [1032.0, 16]]
    assert publisher.arrivals.count == 0  # served now: the next version carries only newer events


def test_a_new_label_publishes_at_the_next_step_and_is_promoted_while_too_few_events_are_held_out(
    tiny_settings: Settings, tiny_trainer: OnlineTrainer
) -> None:
    tiny_settings.registry.first_publish_steps = 1
    holdout = HoldoutWindow(64)
    publisher = make_publisher(tiny_settings, tiny_trainer, holdout)
    assert step(tiny_trainer, publisher, events(16, ["alpha", "beta"], 2, "a"), 1.0) == 1
    assert step(tiny_trainer, publisher, events(16, ["alpha", "beta"], 3, "b"), 2.0) is None  # nothing new
    for event in events(4, ["alpha", "beta"], 4, "h"):  # fewer than gate.min_holdout (32)
        holdout.add(event)
    assert step(tiny_trainer, publisher, events(16, ["alpha", "beta", "gamma"], 5, "c"), 3.0) == 2
    gate = publisher.registry.meta(2)["gate"]
    assert gate["decision"] == "promoted" and "knows 1 label the serving version does not" in gate["reason"]
    assert publisher.registry.meta(2)["arrivals"] == [[2.0, 16], [3.0, 16]]  # v1's events are not counted again

    tiny_settings.registry.publish_on_new_label = False
    assert step(tiny_trainer, publisher, events(16, ["alpha", "delta"], 6, "d"), 4.0) is None


def test_a_rejected_candidates_events_wait_for_the_next_promotion(
    tiny_settings: Settings, tiny_trainer: OnlineTrainer
) -> None:
    tiny_settings.registry.first_publish_steps = 1
    holdout = HoldoutWindow(64)
    publisher = make_publisher(tiny_settings, tiny_trainer, holdout)
    assert step(tiny_trainer, publisher, events(16, ["alpha", "beta"], 7, "a"), 1.0) == 1
    for event in events(4, ["alpha", "beta"], 8, "h"):
        holdout.add(event)
    tiny_trainer.step(tiny_trainer.collator(events(16, ["alpha", "beta"], 9, "b"), n_fresh=16))
    publisher.arrivals.add(2.0, 16)
    rejected = publisher.maybe_publish({}, force=True)  # too few held out, no new label: rejected
    assert rejected == 2 and publisher.registry.meta(2)["gate"]["decision"] == "rejected"
    assert publisher.arrivals.count == 16


def test_the_server_observes_freshness_once_per_newer_version_for_events_since_it_started(
    tiny_settings: Settings, tiny_trainer: OnlineTrainer
) -> None:
    registry = AdapterRegistry(tiny_settings.registry_dir)
    tiny_trainer.step(tiny_trainer.collator(events(16, ["alpha", "beta"], 10, "a"), n_fresh=16))
    state = tiny_trainer.export()
    metrics = ServerMetrics(CollectorRegistry())
    engine = InferenceEngine(tiny_settings, registry, metrics)
    now = time.time()
    engine.started_at = now - 10.0  # as if it had started 10 s ago
    early = registry.publish(state, {"arrivals": [[now - 20.0, 8], [now - 2.0, 3]]}).version
    later = registry.publish(state, {"arrivals": [[now - 1.0, 5], "junk"]}).version

    def observed() -> tuple[float, float]:
        sample = {s.name: s.value for s in metrics.freshness_seconds.collect()[0].samples}
        return sample["dynft_freshness_seconds_count"], sample["dynft_freshness_seconds_sum"]

    engine._install(engine.load(early))
    count, total = observed()
    assert count == 3 and 6.0 <= total < 6.0 + 3 * 60  # 3 events of about 2 s; the 8 from before the start skipped
    engine._install(engine.load(later))
    assert observed()[0] == 8
    engine._install(engine.load(early))  # a rollback: those events were served before
    assert observed()[0] == 8


def outcomes_of(settings: Settings, rows: list[dict[str, object]]) -> tuple[list[str], dict[str, int]]:
    """Each row's ledger outcome, in stream order, and the ledger's counts."""
    ledger = Ledger(settings.state_dir / "ledger.db")
    try:
        outcomes = ledger.lookup(str(r["id"]) for r in rows)
        return [outcomes[str(r["id"])][0] for r in rows], ledger.counts()
    finally:
        ledger.close()


def test_a_trainer_behind_its_live_feed_trains_on_the_newest_and_buffers_the_rest_with_an_outcome(
    tiny_settings: Settings, tmp_path: Path
) -> None:
    tiny_settings.trainer.freshest_first_backlog = 32
    tiny_settings.trainer.freshest_first_after_s = 0.0  # behind as soon as the backlog is exceeded
    source = tmp_path / "events.jsonl"
    source.write_text("")
    tiny_settings.source.uri, tiny_settings.source.follow = f"file:{source}", True
    registry = CollectorRegistry()
    loop = TrainingLoop(tiny_settings, registry)
    thread = threading.Thread(target=loop.run)
    thread.start()
    try:
        # Caught up with the (empty) file: what comes now is a feed.
        wait_until(lambda: loop._lag.live, 120, "the trainer to catch up with the empty file")
        rows = keyword_events(400, ["alpha", "beta"], seed=11)
        write_jsonl(source, rows)  # appended at once: far faster than trained

        def accounted() -> float:
            outcomes = ("trained", "buffered", "held_out")
            return sum(registry.get_sample_value("dynft_events_total", {"outcome": o}) or 0 for o in outcomes)

        wait_until(lambda: accounted() >= 400, 120, "every event to have an outcome")
    finally:
        loop.should_exit.set()
        thread.join(timeout=120)
    assert not thread.is_alive()
    in_order, counts = outcomes_of(tiny_settings, rows)
    assert set(in_order) <= {"trained", "buffered", "held_out"}  # none lost
    assert counts["buffered"] > 0 and counts["trained"] > 0
    assert [status for status in in_order if status != "held_out"][-1] == "trained"  # the newest at once
    assert len(loop.buffer) >= min(counts["buffered"], tiny_settings.buffer.max_events)


def test_a_backlog_read_at_start_is_trained_whole(tiny_settings: Settings, tmp_path: Path) -> None:
    """A file is read far faster than trained, but it is a backlog, not a feed the trainer fell behind."""
    tiny_settings.trainer.freshest_first_backlog = 16
    tiny_settings.trainer.freshest_first_after_s = 0.0
    rows = keyword_events(400, ["alpha", "beta"], seed=12)
    loop = run(tiny_settings, write_jsonl(tmp_path / "events.jsonl", rows))
    _, counts = outcomes_of(tiny_settings, rows)
    assert counts["buffered"] == 0 and counts["trained"] + counts["held_out"] == 400
    assert loop._lag.live  # it did catch up, at the end


def test_without_a_backlog_setting_every_fresh_event_is_trained(tiny_settings: Settings, tmp_path: Path) -> None:
    tiny_settings.trainer.freshest_first_backlog = 0
    rows = keyword_events(96, ["alpha", "beta"], seed=12)
    run(tiny_settings, write_jsonl(tmp_path / "events.jsonl", rows))
    _, counts = outcomes_of(tiny_settings, rows)
    assert counts["buffered"] == 0 and counts["trained"] + counts["held_out"] == 96


def test_a_failed_publish_is_tried_again_without_a_new_step_and_after_a_restart(
    tiny_settings: Settings, tiny_trainer: OnlineTrainer
) -> None:
    """A quiet stream's last steps still become a version: the failed publish is due again on its
    own (after 1 s, then 2 s ...), and a checkpoint taken meanwhile carries that it is."""
    import torch

    from dynft.schedule import RETRY_FIRST_S

    tiny_settings.registry.first_publish_steps = 1
    publisher = make_publisher(tiny_settings, tiny_trainer, HoldoutWindow(64))
    batch = events(16, ["alpha", "beta"], 2, "a")
    tiny_trainer.step(tiny_trainer.collator(batch, n_fresh=len(batch)))
    param = next(iter(tiny_trainer.slots.capture().values()))
    kept = param.detach().clone()
    with torch.no_grad():
        param.fill_(float("nan"))  # a real reason to refuse: nothing non-finite is published
    assert publisher.maybe_publish({}) is None
    assert publisher.registry.versions() == [] and not publisher.due()  # not before the backoff
    state = publisher.snapshot()
    with torch.no_grad():
        param.copy_(kept)
    time.sleep(RETRY_FIRST_S * 1.1)
    assert publisher.maybe_publish({}) == 1  # no step since the failure
    assert publisher.maybe_publish({}) is None  # done: nothing more is due
    restarted = make_publisher(tiny_settings, tiny_trainer, HoldoutWindow(64))
    restarted.restore(state)  # the checkpoint taken while the publish was failing
    time.sleep(RETRY_FIRST_S * 1.1)
    assert restarted.maybe_publish({}) == 2


def test_arrivals_that_are_no_finite_time_are_skipped_not_raised() -> None:
    """``meta.json`` is outside the content hash: what a damaged one says must not stop a swap."""
    from dynft.freshness import served_after

    pairs = [[10**400, 1], [float("inf"), 1], [float("nan"), 1], ["1", 1], [5.0, 2], [1.0, 1]]
    assert list(served_after(pairs, served_at=10.0, since=2.0)) == [5.0, 5.0]


def test_a_restarted_publisher_shows_the_newest_version_before_its_first_publish(
    tiny_settings: Settings, tiny_trainer: OnlineTrainer
) -> None:
    """Found by a probe: after a trainer restart dynft_latest_version had no sample until a publish."""
    tiny_settings.registry.first_publish_steps = 1
    publisher = make_publisher(tiny_settings, tiny_trainer, HoldoutWindow(64))
    assert step(tiny_trainer, publisher, events(16, ["alpha", "beta"], 2, "a"), 1.0) == 1
    metrics = CollectorRegistry()
    again = Publisher(publisher.registry, tiny_trainer, HoldoutWindow(64), tiny_settings, TrainerMetrics(metrics))
    assert metrics.get_sample_value("dynft_latest_version") == 0  # (no sample at all in multiprocess mode)
    again.resume()
    assert metrics.get_sample_value("dynft_latest_version") == 1
    assert metrics.get_sample_value("dynft_task_latest_version", {"task": "default"}) == 1
