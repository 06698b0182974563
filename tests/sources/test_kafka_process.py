"""The Kafka source in a child process, against the real broker: commits, fencing, backpressure,
metrics and logs reach the parent, and either process ending is handled."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from dynft.devbroker import Broker
from dynft.errors import SourceError
from dynft.settings import KafkaSettings
from dynft.sources import Record, furthest
from dynft.sources.kafka_process import KafkaProcessSource

from kafka_helpers import end_offsets, new_topic, publish


def rows(n: int) -> list[object]:
    return [{"id": f"r{i}", "text": f"text {i}", "label": "ab"[i % 2]} for i in range(n)]


def drain(source: KafkaProcessSource, want: int, patience_s: float = 30.0) -> list[Record]:
    out: list[Record] = []
    deadline = time.monotonic() + patience_s
    while len(out) < want and time.monotonic() < deadline:
        out.extend(source.poll(50, 0.1))
    return out


def made(
    broker: Broker, tmp_path: Path, n: int, **settings: object
) -> tuple[KafkaProcessSource, str, str, CollectorRegistry]:
    topic, group = new_topic(broker), f"p-{uuid.uuid4().hex[:6]}"
    publish(broker, topic, rows(n), tmp_path)
    registry = CollectorRegistry()
    source = KafkaProcessSource(
        f"kafka://{broker.bootstrap}/{topic}?group={group}", KafkaSettings(**settings), registry
    )
    return source, topic, group, registry


def ended(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie has ended; its reaper (init here) may be slow


def test_the_final_commit_metrics_and_logs_come_through_the_parent(
    kafka_broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source, topic, group, registry = made(kafka_broker, tmp_path, 60)
    with caplog.at_level(logging.INFO):
        source.open()
        try:
            got = drain(source, 60)
            assert sorted(json.loads(r.raw)["id"] for r in got) == sorted(f"r{i}" for i in range(60))
            half = furthest([r for r in got if int(json.loads(r.raw)["id"][1:]) < 30])
            source.commit(half)
            time.sleep(0.3)  # the child's metrics arrive with a batch, every 0.1 s
            source.poll(1, 0.2)
            assert registry.get_sample_value("dynft_kafka_records_total", {"topic": topic}) == 60
            assert registry.get_sample_value("dynft_kafka_up") == 1
        finally:
            source.close()
    committed = end_offsets(kafka_broker, topic, group)[1]
    assert {f"{topic}/{p}": n for p, n in committed.items() if n} == half
    joined = [r for r in caplog.records if r.name == "dynft.sources.kafka" and "consuming" in r.getMessage()]
    assert joined and joined[0].process != os.getpid(), "the child's log record, re-emitted under its own logger"


def test_a_lost_term_commits_nothing(kafka_broker: Broker, tmp_path: Path) -> None:
    source, topic, group, _ = made(kafka_broker, tmp_path, 20)
    source.may_commit = lambda: False
    source.open()
    try:
        source.commit(furthest(drain(source, 20)))
        source.poll(1, 0.2)
    finally:
        source.close()
    assert not any(end_offsets(kafka_broker, topic, group)[1].values())


def test_paused_it_hands_out_at_most_the_batch_in_flight_then_resumes(kafka_broker: Broker, tmp_path: Path) -> None:
    source, _, _, _ = made(kafka_broker, tmp_path, 400, max_poll_records=20)
    source.open()
    try:
        first = drain(source, 1)
        source.pause()
        batches = [source.poll(20, 0.1) for _ in range(20)]
        during = [r for batch in batches for r in batch]
        assert sum(1 for batch in batches if batch) <= 1, "more than the batch asked for before the pause arrived"
        source.resume()
        rest = drain(source, 400 - len(first) - len(during))
        assert len(first) + len(during) + len(rest) == 400
    finally:
        source.close()


def test_a_consumer_process_killed_is_a_source_error(kafka_broker: Broker, tmp_path: Path) -> None:
    source, _, _, _ = made(kafka_broker, tmp_path, 10)
    source.open()
    pid = source.pid
    assert pid is not None
    try:
        drain(source, 10)
        os.kill(pid, signal.SIGKILL)  # a real fault: the OOM killer, say
        with pytest.raises(SourceError, match="consumer process ended"):
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                source.poll(5, 0.1)
    finally:
        source.close()  # safe after the child is gone


CHILD_OF_A_PARENT = """
import sys, time
from prometheus_client import CollectorRegistry
from dynft.settings import KafkaSettings
from dynft.sources.kafka_process import KafkaProcessSource
source = KafkaProcessSource(sys.argv[1], KafkaSettings(), CollectorRegistry())
source.open()
print(source.pid, flush=True)
time.sleep(600)
"""


def test_the_consumer_process_ends_with_its_parent(kafka_broker: Broker, tmp_path: Path) -> None:
    topic = new_topic(kafka_broker)
    uri = f"kafka://{kafka_broker.bootstrap}/{topic}?group=orphan"
    parent = subprocess.Popen([sys.executable, "-c", CHILD_OF_A_PARENT, uri], stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert not ended(child)
        parent.kill()  # kill -9: no close, no final commit
        parent.wait()
        deadline = time.monotonic() + 20
        while not ended(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ended(child), "the consumer process outlived its parent"
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
