from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dynft.errors import SourceError
from dynft.settings import KafkaSettings, SourceSettings
from dynft.sources import FileSource, Intake, open_source

from helpers import write_jsonl


def test_blank_lines_are_skipped_and_a_last_line_without_newline_counts(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 1}\n\n  \n{"a": 2}\r\n{"a": 3}')
    source = FileSource(str(path))
    source.open()
    records = source.poll(10, 0.1)
    assert [r.raw for r in records] == [b'{"a": 1}', b'{"a": 2}', b'{"a": 3}']
    assert [r.position["line"] for r in records] == [1, 4, 5]
    assert source.exhausted


def test_follow_mode_reads_lines_appended_later(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [{"n": 0}])
    source = FileSource(str(path), follow=True, poll_interval_s=0.02)
    source.open()
    assert [json.loads(r.raw)["n"] for r in source.poll(10, 0.1)] == [0]
    with open(path, "ab") as fh:
        fh.write(b'{"n": 1}\n{"n": ')  # the second line is still being written
        fh.flush()
        assert [json.loads(r.raw)["n"] for r in source.poll(10, 0.2)] == [1]
        fh.write(b"2}\n")
    assert [json.loads(r.raw)["n"] for r in source.poll(10, 0.5)] == [2]
    assert not source.exhausted


def test_stdin_is_read_as_it_arrives(tmp_path: Path) -> None:
    script = (
        "import sys, json\n"
        "from dynft.sources import FileSource\n"
        "s = FileSource('-')\n"
        "s.open()\n"
        "got = []\n"
        "while not s.exhausted:\n"
        "    got += [json.loads(r.raw)['n'] for r in s.poll(10, 0.1)]\n"
        "print(got)\n"
    )
    with subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b'{"n": 1}\n')
        proc.stdin.flush()
        time.sleep(0.3)
        proc.stdin.write(b'{"n": 2}\n')
        proc.stdin.close()
        assert proc.stdout.read().strip() == b"[1, 2]"
        assert proc.wait(timeout=30) == 0


def test_open_errors_name_the_source(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cannot open"):
        FileSource(str(tmp_path / "nope.jsonl")).open()
    with pytest.raises(SourceError, match="is a directory"):
        FileSource(str(tmp_path)).open()
    with pytest.raises(SourceError, match="unknown source"):
        open_source(SourceSettings(uri="ftp://x"), KafkaSettings())
    with pytest.raises(SourceError, match="needs a path"):
        open_source(SourceSettings(uri="file:"), KafkaSettings())


def test_intake_applies_backpressure_and_delivers_everything(tmp_path: Path) -> None:
    rows = [{"n": i} for i in range(500)]
    intake = Intake(FileSource(str(write_jsonl(tmp_path / "in.jsonl", rows))), max_queued=16)
    intake.start()
    time.sleep(0.2)
    assert intake.queued <= 16  # the reader waits for the consumer
    got = []
    deadline = time.monotonic() + 20
    while not intake.finished and time.monotonic() < deadline:
        got += [json.loads(r.raw)["n"] for r in intake.take(50, 0.1)]
    intake.stop()
    assert got == list(range(500))
    assert intake.error is None


def test_intake_reports_a_failing_source() -> None:
    """A read error is injected (a failing disk cannot be produced here): the intake records it."""

    class Broken(FileSource):
        def poll(self, max_records: int, timeout_s: float) -> list:  # type: ignore[type-arg]
            raise OSError("disk gone")

    intake = Intake(Broken("/dev/null"), max_queued=4)
    intake.start()
    for _ in range(100):
        if intake.finished:
            break
        threading.Event().wait(0.02)
    assert isinstance(intake.error, OSError)
    intake.stop()
