"""The daemon against a real Kafka broker: accounting, restarts, groups, slow steps, dead letters."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from kafka import KafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry

from dynft.cli import main
from dynft.devbroker import Broker
from dynft.ledger import Ledger
from dynft.loop import TrainingLoop
from dynft.produce import ensure_topic, produce
from dynft.settings import Settings

from helpers import keyword_events, write_jsonl

pytestmark = pytest.mark.slow
LABELS = ["alpha", "beta", "gamma"]
MALFORMED = [b"{not json", b'{"id": "m1", "text": "", "label": "alpha"}', b"\xff\xfe", b'{"id": "m2", "text": "x"}']


def new_topic(broker: Broker, partitions: int = 3) -> str:
    topic = f"events-{uuid.uuid4().hex[:8]}"
    ensure_topic([broker.bootstrap], topic, partitions, {})
    return topic


def publish(broker: Broker, topic: str, rows: list[object], tmp_path: Path) -> None:
    produce(write_jsonl(tmp_path / f"{uuid.uuid4().hex}.jsonl", rows), [broker.bootstrap], topic, {})


def end_offsets(broker: Broker, topic: str, group: str) -> tuple[dict[int, int], dict[int, int]]:
    """(log end, committed) offset per partition."""
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=group, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        ends = consumer.end_offsets(parts)
        return {tp.partition: ends[tp] for tp in parts}, {tp.partition: consumer.committed(tp) or 0 for tp in parts}
    finally:
        consumer.close()


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def kafka_settings(settings: Settings, broker: Broker, topic: str, group: str) -> Settings:
    settings.source.uri = f"kafka://{broker.bootstrap}/{topic}?group={group}"
    settings.checkpoint.interval_s = 1.0
    settings.kafka.lag_interval_s = 0.5
    return settings


def ledger_of(state_dir: Path) -> Ledger:
    return Ledger(state_dir / "ledger.db")


@pytest.fixture
def running_loop() -> Iterator[Callable[[Settings, CollectorRegistry], TrainingLoop]]:
    loops: list[tuple[TrainingLoop, threading.Thread]] = []

    def start(settings: Settings, metrics: CollectorRegistry) -> TrainingLoop:
        loop = TrainingLoop(settings, metrics)
        thread = threading.Thread(target=loop.run, daemon=True)
        thread.start()
        loops.append((loop, thread))
        return loop

    yield start
    for loop, thread in loops:
        loop.should_exit.set()
        thread.join(120)


def test_10000_events_from_3_partitions_are_all_accounted_for(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path, running_loop
) -> None:  # type: ignore[no-untyped-def]
    topic, group = new_topic(kafka_broker), "accounting"
    events = keyword_events(10_000, LABELS, seed=21)
    rows: list[object] = list(events)
    for i, bad in enumerate(MALFORMED):
        rows.insert(1000 * (i + 1), bad)
    publish(kafka_broker, topic, rows, tmp_path)
    metrics = CollectorRegistry()
    settings = kafka_settings(tiny_settings, kafka_broker, topic, group)
    running_loop(settings, metrics)

    def drained() -> bool:
        ends, committed = end_offsets(kafka_broker, topic, group)
        return committed == ends

    wait_until(drained, 300, "committed offsets to reach the log end")
    ledger = ledger_of(settings.state_dir)
    statuses = ledger.lookup(e["id"] for e in events)
    missing = [i for i, (status, _) in statuses.items() if status not in ("trained", "held_out")]
    assert missing == [], f"{len(missing)} events unaccounted for, e.g. {missing[:5]}"
    counts = ledger.counts()
    assert counts["dead_lettered"] == len(MALFORMED)
    assert counts["duplicates"] == 0
    wait_until(
        lambda: all(
            metrics.get_sample_value("dynft_kafka_lag", {"topic": topic, "partition": str(p)}) == 0 for p in range(3)
        ),
        30,
        "the lag gauge to read 0",
    )
    assert metrics.get_sample_value("dynft_kafka_records_total", {"topic": topic}) == len(rows)
    assert metrics.get_sample_value("dynft_kafka_rebalances_total") == 0

    # The malformed records sit in the dead-letter topic with their reason and origin.
    dlq = KafkaConsumer(
        f"{topic}.dlq", bootstrap_servers=kafka_broker.bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5000
    )
    letters = list(dlq)
    dlq.close()
    assert sorted(m.value for m in letters) == sorted(MALFORMED)
    for m in letters:
        headers = dict(m.headers)
        assert headers["dynft.reason"].decode() in ("malformed_json", "empty_text", "not_utf8", "missing_field")
        assert headers["dynft.source.topic"].decode() == topic
        assert int(headers["dynft.source.offset"]) >= 0 and headers["dynft.source.partition"].decode() in "012"


def trainer_process(settings: Settings, state_dir: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "dynft",
        "train",
        "--model",
        str(settings.model.path),
        "--source",
        settings.source.uri,
        "--state-dir",
        str(state_dir),
        "--set",
        "trainer.lr=0.01",
        "--set",
        "checkpoint.interval_s=1",
        "--set",
        "kafka.session_timeout_ms=6000",
        *extra,
    ]
    with open(log, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def accounted(state_dirs: list[Path], ids: list[str]) -> dict[str, tuple[str, int]]:
    """Each id's status across the given ledgers (trained or held out anywhere wins), and total deliveries."""
    out: dict[str, tuple[str, int]] = {i: ("unseen", 0) for i in ids}
    for state_dir in state_dirs:
        if not (state_dir / "ledger.db").exists():
            continue
        for event_id, (status, seen) in ledger_of(state_dir).lookup(ids).items():
            old_status, old_seen = out[event_id]
            out[event_id] = (status if status != "unseen" else old_status, old_seen + seen)
    return out


def test_sigterm_and_restart_resume_from_committed_offsets(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path
) -> None:
    topic = new_topic(kafka_broker)
    settings = kafka_settings(tiny_settings, kafka_broker, topic, "restart")
    first, second = keyword_events(3000, LABELS, seed=22), keyword_events(2000, LABELS, seed=23, prefix="s")
    ids = [e["id"] for e in first + second]
    publish(kafka_broker, topic, first, tmp_path)
    state = tmp_path / "state"
    proc = trainer_process(settings, state, tmp_path / "a.log")
    wait_until(
        lambda: (state / "ledger.db").exists() and ledger_of(state).counts()["trained"] > 800,
        180,
        "the first run to train",
    )
    assert stop(proc) == 0
    publish(kafka_broker, topic, second, tmp_path)
    proc = trainer_process(settings, state, tmp_path / "b.log")
    try:
        wait_until(
            lambda: all(s != "unseen" for s, _ in accounted([state], ids).values()),
            240,
            "every event to be accounted for",
        )
    finally:
        assert stop(proc) == 0
    result = accounted([state], ids)
    assert {s for s, _ in result.values()} <= {"trained", "held_out"}
    duplicates = sum(seen - 1 for _, seen in result.values())
    assert duplicates == 0, "a clean stop checkpoints and commits everything it took"
    assert "resumed from" in (tmp_path / "b.log").read_text()
    ends, committed = end_offsets(kafka_broker, topic, "restart")
    assert committed == ends


def test_two_daemons_split_the_partitions_and_one_takes_over(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path
) -> None:
    topic = new_topic(kafka_broker)
    settings = kafka_settings(tiny_settings, kafka_broker, topic, "pair")
    first, second = keyword_events(4000, LABELS, seed=24), keyword_events(2000, LABELS, seed=25, prefix="t")
    ids = [e["id"] for e in first + second]
    state_a, state_b = tmp_path / "a", tmp_path / "b"
    a = trainer_process(settings, state_a, tmp_path / "a.log")
    b = trainer_process(settings, state_b, tmp_path / "b.log")
    try:
        time.sleep(15)  # both join before data flows
        publish(kafka_broker, topic, first, tmp_path)
        wait_until(
            lambda: all(s != "unseen" for s, _ in accounted([state_a, state_b], [e["id"] for e in first]).values()),
            240,
            "the pair to consume the first batch",
        )
        share_a, share_b = (ledger_of(s).counts()["trained"] for s in (state_a, state_b))
        assert share_a > 0 and share_b > 0, f"the partitions were not split: {share_a} / {share_b}"
        assert stop(a) == 0
        publish(kafka_broker, topic, second, tmp_path)
        wait_until(
            lambda: all(s != "unseen" for s, _ in accounted([state_a, state_b], ids).values()),
            240,
            "the survivor to consume everything",
        )
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                assert stop(proc) == 0
    result = accounted([state_a, state_b], ids)
    assert {s for s, _ in result.values()} <= {"trained", "held_out"}
    assert all(result[e["id"]][1] >= 1 for e in second)
    assert "partitions assigned" in (tmp_path / "b.log").read_text()


def test_a_step_slower_than_max_poll_interval_keeps_the_group_membership(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path, running_loop
) -> None:  # type: ignore[no-untyped-def]
    """A slow step is injected (a real slow GPU step cannot be produced here): the intake keeps
    polling, pauses the partitions when its queue fills, and the group never rebalances."""
    topic, group = new_topic(kafka_broker), "slow"
    events = keyword_events(1500, LABELS, seed=26)
    publish(kafka_broker, topic, events, tmp_path)
    settings = kafka_settings(tiny_settings, kafka_broker, topic, group)
    settings.kafka.max_poll_interval_ms = 3000
    settings.kafka.session_timeout_ms = 6000
    settings.kafka.max_poll_records = 100
    settings.source.queue_size = 64
    metrics = CollectorRegistry()
    loop = running_loop(settings, metrics)
    wait_until(lambda: loop.started.is_set(), 120, "the loop to start")
    real_step, slow_steps = loop.trainer.step, [0]

    def slow_step(batch):  # type: ignore[no-untyped-def]
        if slow_steps[0] < 2:
            slow_steps[0] += 1
            time.sleep(4.5)  # 1.5 x max_poll_interval_ms
        return real_step(batch)

    loop.trainer.step = slow_step  # type: ignore[method-assign]
    wait_until(
        lambda: end_offsets(kafka_broker, topic, group)[1] == end_offsets(kafka_broker, topic, group)[0],
        240,
        "everything to be consumed",
    )
    assert slow_steps[0] == 2
    assert metrics.get_sample_value("dynft_kafka_rebalances_total") == 0
    statuses = ledger_of(settings.state_dir).lookup(e["id"] for e in events)
    assert {s for s, _ in statuses.values()} <= {"trained", "held_out"}


def test_produce_keys_records_so_a_label_lands_on_one_partition(kafka_broker: Broker, tmp_path: Path) -> None:
    topic = f"keyed-{uuid.uuid4().hex[:8]}"
    path = write_jsonl(tmp_path / "in.jsonl", keyword_events(300, LABELS, seed=27))
    result = CliRunner().invoke(
        main,
        [
            "produce",
            str(path),
            "--topic",
            topic,
            "--bootstrap",
            kafka_broker.bootstrap,
            "--partitions",
            "3",
            "--key",
            "label",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "produced 300 records" in result.output
    consumer = KafkaConsumer(
        topic, bootstrap_servers=kafka_broker.bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5000
    )
    partitions: dict[str, set[int]] = {}
    for m in consumer:
        partitions.setdefault(json.loads(m.value)["label"], set()).add(m.partition)
    consumer.close()
    assert set(partitions) == set(LABELS) and all(len(p) == 1 for p in partitions.values())
