"""The JSON Lines dead-letter sink: on a real full disk (a tmpfs filled to the last byte), and its rotation."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynft.deadletter import JsonlDeadLetterSink, dead_letter_files, read_dead_letters
from dynft.errors import StateCorruptError, exit_code
from dynft.events import Rejection
from dynft.sources.base import Record

from test_state_faults import fill, mounted


def rejected(n: int) -> tuple[Rejection, Record]:
    pad = "x" * 8192  # more than a page: the write needs blocks a full disk no longer has
    raw = f'{{"text": "", "label": "x", "n": {n}, "pad": "{pad}"}}'.encode()
    return Rejection("empty_text", "text is empty", raw), Record(raw, "file:in.jsonl", n + 1, None, {"line": n})


@pytest.mark.slow
def test_a_full_disk_keeps_dead_letters_in_memory_and_writes_them_whole_once_it_has_room(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with mounted(tmp_path / "disk", "-t", "tmpfs", "-o", "size=1m", "tmpfs") as disk:
        sink = JsonlDeadLetterSink(disk / "dead.jsonl", "file:in.jsonl")
        sink.write(*rejected(0))
        sink.flush()
        filler = fill(disk)
        for n in range(1, 4):
            sink.write(*rejected(n))  # no exception: the records wait in memory
        with pytest.raises(OSError):
            sink.flush()  # so the checkpoint that would commit their positions fails
        assert [e["origin"]["line"] for e in read_dead_letters(disk / "dead.jsonl")] == [0], "no half lines"
        filler.unlink()
        sink.flush()
        entries = read_dead_letters(disk / "dead.jsonl")
        assert [e["origin"]["line"] for e in entries] == [0, 1, 2, 3]
        assert entries[3]["raw_bytes"] == rejected(3)[0].raw
        sink.close()


def small(n: int, pad: int = 200) -> tuple[Rejection, Record]:
    raw = f'{{"text": "", "label": "x", "n": {n}, "pad": "{"y" * pad}"}}'.encode()
    return Rejection("empty_text", "text is empty", raw), Record(raw, "file:in.jsonl", n + 1, None, {"line": n})


def test_rotation_bounds_sizes_and_files_and_keeps_the_newest_entries(tmp_path: Path) -> None:
    path = tmp_path / "dead-letter.jsonl"
    sink = JsonlDeadLetterSink(path, "file:in.jsonl", max_bytes=4096, max_files=3)
    rotated_out = 0  # the oldest entry still in some file
    for n in range(300):
        sink.write(*small(n))
        sink.flush()
        files = dead_letter_files(path)
        lines = [e["origin"]["line"] for f in files for e in read_dead_letters(f)]
        assert lines[-1] == n, "the newest entry is in the current file"
        assert lines == list(range(lines[0], n + 1)), "every entry since the oldest kept is in some file, in order"
        assert lines[0] >= rotated_out, "entries leave only by rotation, oldest first"
        rotated_out = lines[0]
        assert len(files) <= 4 and all(f.stat().st_size <= 4096 for f in files)
    assert [f.name for f in dead_letter_files(path)] == [
        "dead-letter.jsonl.3",
        "dead-letter.jsonl.2",
        "dead-letter.jsonl.1",
        "dead-letter.jsonl",
    ]
    assert rotated_out > 0, "rotation deleted the oldest file"
    assert not (tmp_path / "dead-letter.jsonl.4").exists()
    sink.close()


def test_an_entry_larger_than_max_bytes_gets_a_file_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "dead-letter.jsonl"
    sink = JsonlDeadLetterSink(path, "file:in.jsonl", max_bytes=4096, max_files=2)
    sink.write(*small(0))
    sink.write(*small(1, pad=6000))
    sink.write(*small(2))
    sink.flush()
    sink.close()
    by_file = [[e["origin"]["line"] for e in read_dead_letters(f)] for f in dead_letter_files(path)]
    assert by_file == [[0], [1], [2]]
    assert read_dead_letters(path.with_name("dead-letter.jsonl.1"))[0]["raw_bytes"] == small(1, pad=6000)[1].raw


def test_a_reopened_sink_rotates_a_file_already_at_its_size(tmp_path: Path) -> None:
    path = tmp_path / "dead-letter.jsonl"
    path.write_bytes(b"{}\n" * 1500)  # 4500 bytes from an earlier run
    sink = JsonlDeadLetterSink(path, "file:in.jsonl", max_bytes=4096, max_files=2)
    sink.write(*small(0))
    sink.close()
    assert path.with_name("dead-letter.jsonl.1").read_bytes() == b"{}\n" * 1500
    assert [e["origin"]["line"] for e in read_dead_letters(path)] == [0]


def test_a_large_record_is_stored_once_as_bytes_not_twice(tmp_path: Path) -> None:
    """A review found each 1 MB record stored as text and as base64 (2.4 MB a dead letter): the
    text copy is kept for records of at most 64 KiB only; the exact bytes always."""
    path = tmp_path / "dead-letter.jsonl"
    sink = JsonlDeadLetterSink(path, "file:in.jsonl")
    for n, size in enumerate([100, (64 << 10) + 1]):
        raw = b'{"text": "' + b"y" * size + b'"}'
        sink.write(Rejection("record_too_large", "big", raw), Record(raw, "file:in.jsonl", n + 1, None, {"line": n}))
    sink.flush()
    sink.close()
    small_entry, large_entry = read_dead_letters(path)
    assert small_entry["raw"] == small_entry["raw_bytes"].decode() and large_entry["raw"] is None
    assert len(large_entry["raw_bytes"]) == (64 << 10) + 1 + 12
    assert path.stat().st_size < 1.4 * ((64 << 10) + 12)  # base64's 4/3, once


def test_a_directory_where_the_dead_letter_file_belongs_is_a_state_error(tmp_path: Path) -> None:
    """Found by a probe: "Is a directory", exit 1, and `dynft run` restarted the trainer for ever."""
    (tmp_path / "dead-letter.jsonl").mkdir()
    with pytest.raises(StateCorruptError, match=r"dead-letter file .*dead-letter\.jsonl: a directory") as err:
        JsonlDeadLetterSink(tmp_path / "dead-letter.jsonl", "file:x")
    assert exit_code(err.value) == 2
