"""One contract every source passes (river's checks style): records are raw bytes in order,
positions name a stream and where to resume, finite sources end, close is safe, and a source
resumed from positions continues right after them."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from dynft.devbroker import Broker
from dynft.metrics import KafkaMetrics
from dynft.produce import ensure_topic, produce
from dynft.settings import KafkaSettings
from dynft.sources import DemoSource, FileSource, Record, Source, furthest
from dynft.sources.kafka import KafkaSource
from dynft.sources.kafka_process import KafkaProcessSource

from helpers import write_jsonl


@dataclass
class Made:
    make: Callable[[], Source]  # a new source over the same data
    count: int | None  # records it holds, when known
    finite: bool


def rows(n: int) -> list[dict[str, object]]:
    return [{"id": f"r{i}", "text": f"text {i}", "label": "ab"[i % 2]} for i in range(n)]


def file_made(tmp_path: Path, request: pytest.FixtureRequest) -> Made:
    path = write_jsonl(tmp_path / "in.jsonl", rows(25))
    return Made(lambda: FileSource(str(path)), 25, True)


def demo_made(tmp_path: Path, request: pytest.FixtureRequest) -> Made:
    return Made(lambda: DemoSource(loop=False), None, True)


def demo_loop_made(tmp_path: Path, request: pytest.FixtureRequest) -> Made:
    return Made(lambda: DemoSource(loop=True), None, False)


def kafka_made(tmp_path: Path, request: pytest.FixtureRequest, in_process: bool = True) -> Made:
    broker: Broker = request.getfixturevalue("kafka_broker")
    topic = f"contract-{uuid.uuid4().hex[:8]}"
    ensure_topic([broker.bootstrap], topic, 3, {})
    produce(write_jsonl(tmp_path / "in.jsonl", rows(25)), [broker.bootstrap], topic, {})
    group = f"g-{uuid.uuid4().hex[:6]}"
    uri = f"kafka://{broker.bootstrap}/{topic}?group={group}"
    if not in_process:
        return Made(lambda: KafkaProcessSource(uri, KafkaSettings(), _registry()), 25, False)
    return Made(lambda: KafkaSource(uri, KafkaSettings(), KafkaMetrics(_registry())), 25, False)


def kafka_process_made(tmp_path: Path, request: pytest.FixtureRequest) -> Made:
    return kafka_made(tmp_path, request, in_process=False)


def _registry():  # type: ignore[no-untyped-def]
    from prometheus_client import CollectorRegistry

    return CollectorRegistry()


SOURCES = {
    "file": file_made,
    "demo": demo_made,
    "demo-loop": demo_loop_made,
    "kafka": kafka_made,
    "kafka-process": kafka_process_made,
}


@pytest.fixture(params=sorted(SOURCES))
def made(request: pytest.FixtureRequest, tmp_path: Path) -> Made:
    return SOURCES[request.param](tmp_path, request)


def drain(source: Source, limit: int, patience_s: float = 20.0) -> list[Record]:
    out: list[Record] = []
    deadline = time.monotonic() + patience_s
    while len(out) < limit and time.monotonic() < deadline:
        records = source.poll(7, timeout_s=0.1)
        out.extend(records)
        if not records and source.exhausted:
            break
    return out


def test_records_are_json_with_distinct_positions(made: Made) -> None:
    source = made.make()
    source.open()
    try:
        got = drain(source, made.count or 30)
        assert got, "the source gave nothing"
        assert all(isinstance(r.stream, str) and isinstance(r.next, int) for r in got)
        positions = [(r.stream, r.next) for r in got]
        assert len(set(positions)) == len(positions)
        ids = [json.loads(r.raw)["id"] for r in got]
        assert len(set(ids)) == len(ids), "ids repeat within a stream"
        if made.count is not None:
            assert len(got) == made.count
    finally:
        source.close()


def test_finite_sources_end_and_infinite_ones_wait(made: Made) -> None:
    source = made.make()
    source.open()
    try:
        got = drain(source, 5_000 if made.count is None else made.count)
        if made.finite:
            assert source.exhausted and source.poll(5, 0.01) == []
            if made.count is not None:
                assert len(got) == made.count
        else:
            assert not source.exhausted
            if made.count is not None:
                assert source.poll(5, 0.5) == []  # nothing beyond what was produced
    finally:
        source.close()


def test_resuming_after_positions_continues_right_after_them(made: Made) -> None:
    first = made.make()
    first.open()
    try:
        head = drain(first, 10)[:10]
    finally:
        first.close()
    assert len(head) == 10
    resumed = made.make()
    resumed.resume_from(furthest(head))
    resumed.open()
    try:
        rest = drain(resumed, 5)
    finally:
        resumed.close()
    seen = {json.loads(r.raw)["id"] for r in head}
    assert rest and not seen & {json.loads(r.raw)["id"] for r in rest}


def test_pause_resume_commit_and_close_are_safe(made: Made) -> None:
    source = made.make()
    source.open()
    records = drain(source, 3)
    source.pause()
    source.poll(0, 0.05)
    source.resume()
    source.commit(furthest(records))
    source.poll(1, 0.05)
    source.close()
