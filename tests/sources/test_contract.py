"""One contract every source passes (river's checks style): records are raw bytes in order,
positions identify them, a finite source ends, and close is safe."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from dynft.sources import DemoSource, FileSource, Source

from helpers import write_jsonl

Factory = Callable[[Path], tuple[Source, int | None]]  # the source, and its length when finite


def file_source(tmp_path: Path) -> tuple[Source, int | None]:
    rows = [{"id": f"f{i}", "text": f"text {i}", "label": "ab"[i % 2]} for i in range(25)]
    return FileSource(str(write_jsonl(tmp_path / "in.jsonl", rows))), 25


def demo_source(tmp_path: Path) -> tuple[Source, int | None]:
    return DemoSource(loop=False), None


def demo_looping(tmp_path: Path) -> tuple[Source, int | None]:
    return DemoSource(loop=True), None


SOURCES = {"file": file_source, "demo": demo_source, "demo-loop": demo_looping}


def drain(source: Source, limit: int) -> list[bytes]:
    out: list[bytes] = []
    for _ in range(10_000):
        records = source.poll(7, timeout_s=0.05)
        out.extend(r.raw for r in records)
        if len(out) >= limit or (not records and source.exhausted):
            break
    return out


@pytest.fixture(params=sorted(SOURCES))
def made(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Source, int | None]:
    return SOURCES[request.param](tmp_path)


def test_poll_returns_json_records_with_distinct_positions(made: tuple[Source, int | None]) -> None:
    source, _ = made
    source.open()
    try:
        records = []
        while len(records) < 30 and not source.exhausted:
            records.extend(source.poll(7, timeout_s=0.05))
        assert all(len(source.poll(7, 0.01)) <= 7 for _ in range(3))
        assert records, "the source gave nothing"
        positions = [json.dumps(r.position, sort_keys=True) for r in records]
        assert len(set(positions)) == len(positions)
        ids = [json.loads(r.raw)["id"] for r in records]
        assert len(set(ids)) == len(ids), "ids repeat within a stream"
    finally:
        source.close()


def test_finite_sources_end_and_say_so(made: tuple[Source, int | None]) -> None:
    source, length = made
    source.open()
    try:
        got = drain(source, limit=5_000)
        if length is not None:
            assert len(got) == length
            assert source.exhausted
            assert source.poll(5, 0.01) == []
        elif isinstance(source, DemoSource) and not source.exhausted:
            assert len(got) >= 5_000  # a looping source keeps giving
    finally:
        source.close()


def test_commit_and_close_are_safe_to_call(made: tuple[Source, int | None]) -> None:
    source, _ = made
    source.open()
    records = source.poll(3, 0.05)
    source.commit([r.position for r in records])
    source.close()
