"""The JSON Lines dead-letter sink on a real full disk (a tmpfs filled to the last byte)."""

from __future__ import annotations

import pytest

from dynft.deadletter import JsonlDeadLetterSink, read_dead_letters
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
