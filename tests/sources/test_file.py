from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from dynft.errors import SourceError
from dynft.events import Rejection, decode
from dynft.settings import EventSettings, KafkaSettings, Settings, SourceSettings
from dynft.sources import FileSource, Intake, Record, furthest, open_source, rotation
from dynft.sources.rotation import byte_offset

from helpers import keyword_events, write_jsonl


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


def test_follow_mode_reads_a_file_rewritten_in_place_again_even_when_it_grew(tmp_path: Path) -> None:
    """Truncated and rewritten longer between two polls, the file's size alone did not show it:
    reading went on at the old offset, in the middle of a new line. Its first bytes show it."""
    path = write_jsonl(tmp_path / "in.jsonl", [{"n": 0}, {"n": 1}])
    source = FileSource(str(path), follow=True, poll_interval_s=0.02)
    source.open()
    assert [json.loads(r.raw)["n"] for r in source.poll(10, 0.1)] == [0, 1]
    write_jsonl(path, [{"n": 10 + i, "pad": "x" * 20} for i in range(3)])  # truncates, then writes more
    got = [json.loads(r.raw)["n"] for r in source.poll(10, 0.3)]
    assert got == [10, 11, 12]


def test_follow_mode_reads_a_file_rewritten_in_place_with_the_same_first_bytes_again(tmp_path: Path) -> None:
    """A rewrite that keeps the first line (longer than the bytes remembered of the file's start)
    and makes the file longer: the bytes before the read position changed."""
    first = {"n": 0, "pad": "x" * 300}
    path = write_jsonl(tmp_path / "in.jsonl", [first, {"n": 1}])
    source = FileSource(str(path), follow=True, poll_interval_s=0.02)
    source.open()
    assert numbers(source.poll(10, 0.1)) == [0, 1]
    write_jsonl(path, [first, {"n": 21, "pad": "y" * 20}, {"n": 22}])
    assert numbers(poll_until(source, 3)) == [0, 21, 22]
    with open(path, "ab") as fh:  # appended, not rewritten: read on
        fh.write(b'{"n": 23}\n')
    assert numbers(poll_until(source, 1)) == [23]
    source.close()


def numbers(records: list[Record]) -> list[int]:
    return [json.loads(r.raw)["n"] for r in records]


def poll_until(source: FileSource, count: int, patience_s: float = 10.0) -> list[Record]:
    got: list[Record] = []
    deadline = time.monotonic() + patience_s
    while len(got) < count and time.monotonic() < deadline:
        got += source.poll(10, 0.1)
    return got


def stopped_after(path: Path, rows: int, taken: int) -> tuple[Path, int]:
    """``path`` written with ``rows`` lines (n = 0, 1, ...), of which a follower read ``taken``
    before it stopped, and the position it stopped at (its checkpoint)."""
    write_jsonl(path, [{"n": i} for i in range(rows)])
    source = FileSource(str(path), follow=True, poll_interval_s=0.02)
    source.open()
    checkpoint = source.poll(taken, 0.1)[-1].next
    source.close()
    return path, checkpoint


def test_follow_mode_follows_a_rotated_file_after_reading_the_old_one_to_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """logrotate's way (rename, create anew): the old file is read on while its writer still
    appends to it, then the new file from its start; positions keep growing throughout, and a
    restart from the last one resumes in the new file, right after it."""
    monkeypatch.setattr(rotation, "ROTATION_GRACE_S", 0.3)
    path = write_jsonl(tmp_path / "in.jsonl", [{"n": 0}])
    source = FileSource(str(path), follow=True, poll_interval_s=0.02)
    source.open()
    got = source.poll(10, 0.1)
    path.rename(tmp_path / "in.jsonl.1")
    write_jsonl(path, [{"n": 100}, {"n": 101}])
    with open(tmp_path / "in.jsonl.1", "ab") as fh:  # a writer still holding the old file
        fh.write(b'{"n": 1}\n{"n": 2}')  # its last line never gets a newline
    got += poll_until(source, 4)
    assert numbers(got) == [0, 1, 2, 100, 101]
    positions = [r.next for r in got]
    assert positions == sorted(positions) and len(set(positions)) == 5, "the checkpoint keeps the furthest"
    assert [byte_offset(p) for p in positions[-2:]] == [11, 22]  # offsets in the new file
    with open(path, "ab") as fh:
        fh.write(b'{"n": 102}\n')
    assert numbers(poll_until(source, 1)) == [102]
    source.close()
    again = FileSource(str(path), follow=True, poll_interval_s=0.02)
    again.resume_from({again.uri: positions[-1]})
    again.open()
    assert numbers(poll_until(again, 1)) == [102]
    again.close()


def test_a_file_rotated_twice_before_it_was_read_is_not_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader behind its file (a slow trainer) while the path is rotated twice: the file in
    between is read too, in its turn, also when the reader polled nothing meanwhile (paused)."""
    monkeypatch.setattr(rotation, "ROTATION_GRACE_S", 0.2)
    path = write_jsonl(tmp_path / "in.jsonl", [{"n": i} for i in range(30)])
    source = FileSource(str(path), follow=True, poll_interval_s=0.02)
    source.open()
    got = source.poll(5, 0.1)
    path.rename(tmp_path / "in.jsonl.1")
    write_jsonl(path, [{"n": 100 + i} for i in range(3)])
    assert source.poll(0, 0.0) == []  # an intake that is paused still polls for nothing
    path.rename(tmp_path / "in.jsonl.2")
    write_jsonl(path, [{"n": 200 + i} for i in range(3)])
    (tmp_path / "in.jsonl.2").unlink()  # removed by the rotation too: its lines were still to be read
    got += poll_until(source, 31)
    assert numbers(got) == [*range(30), 100, 101, 102, 200, 201, 202]
    assert [r.next for r in got] == sorted(r.next for r in got)
    source.close()


def test_a_restart_reads_the_rest_of_a_file_rotated_before_its_checkpoint_covered_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Killed after a rotation, before a checkpoint covered the old file's end (or rotated while
    stopped): the old file, renamed beside the path, is found by its inode and read on first."""
    monkeypatch.setattr(rotation, "ROTATION_GRACE_S", 0.2)
    path = write_jsonl(tmp_path / "in.jsonl", [{"n": i} for i in range(5)])
    source = FileSource(str(path), follow=True, poll_interval_s=0.02)
    source.open()
    checkpoint = source.poll(2, 0.1)[-1].next  # n=0, 1 trained and checkpointed; then killed
    source.close()
    path.rename(tmp_path / "in.jsonl.1")
    write_jsonl(path, [{"n": 100}, {"n": 101}])
    again = FileSource(str(path), follow=True, poll_interval_s=0.02)
    again.resume_from({again.uri: checkpoint})
    with caplog.at_level(logging.WARNING, logger="dynft.sources.file"):
        again.open()
        got = poll_until(again, 5)
    assert numbers(got) == [2, 3, 4, 100, 101]
    assert got[0].next > checkpoint and [r.next for r in got] == sorted(r.next for r in got)
    assert any("rotated while stopped; reading the rest of" in r.message for r in caplog.records)
    again.close()


def test_a_restart_reads_every_file_rotated_while_stopped_in_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rotated twice after the checkpoint (while stopped, or with successors queued when killed):
    the checkpoint's file, then the one rotated after it, then the path's; older ones, compressed
    ones and files named like the path that are no rotation (a backup, a swap file, a sibling
    stream) are not read. By name where the files are named as rotated: the checkpoint's file was
    written last here (a late write), and the file times are equal besides."""
    monkeypatch.setattr(rotation, "ROTATION_GRACE_S", 0.1)
    write_jsonl(tmp_path / "in.jsonl.3", [{"n": -1}])  # rotated before the checkpoint's file
    time.sleep(0.05)
    path, checkpoint = stopped_after(tmp_path / "in.jsonl", 4, 2)
    path.rename(tmp_path / "in.jsonl.2")
    time.sleep(0.05)  # file times tick coarsely: the rotations are apart, as real ones are
    write_jsonl(path, [{"n": 100}, {"n": 101}])
    path.rename(tmp_path / "in.jsonl.1")
    (tmp_path / "in.jsonl.1.gz").write_bytes(b"\x1f\x8b not JSON Lines")
    time.sleep(0.05)
    write_jsonl(path, [{"n": 200}])
    for other in ("in.jsonl.bak", "in.jsonl.swp", "in.jsonl-eu"):
        write_jsonl(tmp_path / other, [{"n": 900}])
    late = (tmp_path / "in.jsonl.2").stat().st_mtime_ns + 10**9
    for name in ("in.jsonl.1", "in.jsonl.2"):
        os.utime(tmp_path / name, ns=(late, late))
    again = FileSource(str(path), follow=True, poll_interval_s=0.02)
    again.resume_from({again.uri: checkpoint})
    again.open()
    got = poll_until(again, 5)
    assert numbers(got) == [2, 3, 100, 101, 200]
    assert [r.next for r in got] == sorted(r.next for r in got)
    again.close()


def test_a_file_copied_then_truncated_while_the_reader_is_behind_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """logrotate's ``copytruncate``: the file is copied beside the path, then truncated in place,
    while the reader is behind (a slow trainer). The unread rest is read from the copy, then the
    truncated file from its top; positions keep growing, and a restart from one taken in the copy
    reads the copy's rest, then the path's file. Before, the rest was lost with a warning."""
    monkeypatch.setattr(rotation, "ROTATION_GRACE_S", 0.2)
    path = write_jsonl(tmp_path / "in.jsonl", [{"n": i} for i in range(30)])
    source = FileSource(str(path), follow=True, poll_interval_s=0.02)
    source.open()
    got = source.poll(5, 0.1)
    (tmp_path / "in.jsonl.1").write_bytes(path.read_bytes())  # the copy, then the truncation
    path.write_bytes(b"")
    with open(path, "ab") as fh:
        fh.write(b'{"n": 100}\n{"n": 101}\n')
    with caplog.at_level(logging.WARNING, logger="dynft.sources.file"):
        got += poll_until(source, 27)
    assert numbers(got) == [*range(30), 100, 101]
    assert [r.next for r in got] == sorted(r.next for r in got) and len({r.next for r in got}) == 32
    assert any("copytruncate" in r.message and "in.jsonl.1" in r.message for r in caplog.records)
    source.close()
    again = FileSource(str(path), follow=True, poll_interval_s=0.02)  # killed after n=9, read from the copy
    again.resume_from({again.uri: got[9].next})
    again.open()
    assert numbers(poll_until(again, 22)) == [*range(10, 30), 100, 101]
    again.close()


def test_follow_mode_waits_for_a_path_that_does_not_exist_yet(tmp_path: Path) -> None:
    """As ``tail -F``: a followed path missing at start is waited for (without follow it is an error)."""
    path = tmp_path / "later.jsonl"
    source = FileSource(str(path), follow=True, poll_interval_s=0.02)
    source.open()
    assert source.poll(10, 0.1) == [] and not source.exhausted
    write_jsonl(path, [{"n": 0}, {"n": 1}])
    assert numbers(poll_until(source, 2)) == [0, 1]
    source.close()


def test_a_restart_reads_the_rotated_rest_while_the_path_is_not_created_again_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped, then rotated (renamed away) before the path was created anew: the checkpoint's
    file is read on beside it, and the path is read once it exists. Before, the start failed."""
    monkeypatch.setattr(rotation, "ROTATION_GRACE_S", 0.2)
    path, checkpoint = stopped_after(tmp_path / "in.jsonl", 5, 2)
    path.rename(tmp_path / "in.jsonl.1")
    again = FileSource(str(path), follow=True, poll_interval_s=0.02)
    again.resume_from({again.uri: checkpoint})
    again.open()
    got = poll_until(again, 3)
    write_jsonl(path, [{"n": 100}])
    got += poll_until(again, 1)
    assert numbers(got) == [2, 3, 4, 100]
    assert [r.next for r in got] == sorted(r.next for r in got)
    again.close()


def test_line_numbers_are_left_out_after_a_restart_mid_file_not_counted_from_one(tmp_path: Path) -> None:
    """A restart resumes at a byte offset; the lines before it are not counted, so a dead letter
    names the offset alone rather than a wrong line number (found by a review: "line 1" for line 6)."""
    path = write_jsonl(tmp_path / "in.jsonl", [{"n": i} for i in range(6)])
    source = FileSource(str(path))
    source.open()
    first = source.poll(3, 0.1)
    assert [r.position["line"] for r in first] == [1, 2, 3]
    source.close()
    again = FileSource(str(path))
    again.resume_from({again.uri: first[-1].next})
    again.open()
    rest = again.poll(10, 0.1)
    assert numbers(rest) == [3, 4, 5] and all("line" not in r.position for r in rest)
    assert [r.position["offset"] for r in rest] == [byte_offset(r.next) for r in [first[-1], *rest[:-1]]]
    again.close()


def _lines(rows: list[object]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


LONG = {"pad": "x" * 80, "source": "web-frontend", "lang": "en"}


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (_lines([{"n": 10 + i} for i in range(12)]), _lines([{"n": 50 + i} for i in range(12)])),  # fixed width
        (b"0\n1\n2\n3\n4\n5\n6\n7\n8\n9\n", b"9\n8\n7\n6\n3\n5\n1\n2\n0\n4\n"),  # "5\n" at the offset both times
        (_lines([{"n": 10 + i, **LONG} for i in range(12)]), _lines([{"n": 50 + i, **LONG} for i in range(12)])),
    ],
    ids=["fixed-width", "two-byte-lines", "long-lines-alike-at-the-end"],
)
def test_a_restart_does_not_resume_in_another_file_that_has_a_line_end_at_the_offset(
    tmp_path: Path, before: bytes, after: bytes
) -> None:
    """An inode number reused for another file of lines as long (fixed-width records; copytruncate
    while stopped): a newline sits at the checkpoint's offset, but not after what was read."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(before)
    source = FileSource(str(path))
    source.open()
    checkpoint = poll_until(source, 6)[5].next
    source.close()
    with open(path, "r+b") as fh:  # the same inode, the same line widths, other lines
        fh.write(after)
    assert after[byte_offset(checkpoint) - 1 : byte_offset(checkpoint)] == b"\n"
    again = FileSource(str(path))
    again.resume_from({again.uri: checkpoint})
    again.open()
    assert b"".join(r.raw + b"\n" for r in poll_until(again, after.count(b"\n"))) == after


def test_a_restart_from_any_position_reads_exactly_the_lines_after_it(tmp_path: Path) -> None:
    """Positions check bytes before them across reads and polls (short lines, a cut over-long
    line, CRLF, a byte order mark, a last line without newline): resumed from each one, the same
    file gives exactly the lines after it. Every position checks at least 64 bytes (or all before
    it), also one taken soon after a restart or right after a cut line: with fewer, another file
    that got the inode number passed the check (found by a review: 4 lines lost)."""
    rows = [b"\xef\xbb\xbf1", b"22", b"3", b"x" * 200_000, b"4\r", b"", b"5" * 70, *[b"%d" % i for i in range(6, 40)]]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(rows))  # the last line has no newline
    source = FileSource(str(path), max_record_bytes=100)
    source.open()
    got: list[Record] = []
    while not source.exhausted:
        got += source.poll(3, 0.1)
    source.close()
    assert len(got) == len(rows) - 1 and got[3].position["bytes"] == 200_000, "the long line is cut"
    for i, record in enumerate(got):
        again = FileSource(str(path), max_record_bytes=100)
        again.resume_from({again.uri: record.next})
        again.open()
        rest: list[Record] = []
        while not again.exhausted:
            rest += again.poll(5, 0.1)
        again.close()
        assert [r.raw for r in rest] == [r.raw for r in got[i + 1 :]], f"resumed after record {i}"
        for r in [record, *rest]:
            at = rotation.parse(r.next)
            assert at.checked >= min(rotation.CHECKED, at.offset), (i, at)


def test_a_restart_does_not_seek_into_content_rewritten_while_stopped(tmp_path: Path) -> None:
    """Same inode, other bytes (rewritten in place, or the inode number went to another file): the
    checkpoint's offset is no line start there, and the file is read from its start. A file whose
    last line had no newline goes on at its end: its lines are not read twice."""
    path = write_jsonl(tmp_path / "in.jsonl", [{"n": i, "pad": "x" * 10} for i in range(3)])
    source = FileSource(str(path))
    source.open()
    checkpoint = poll_until(source, 2)[1].next
    source.close()
    with open(path, "r+b") as fh:  # the same inode, new lines of other lengths
        fh.write(b"".join(json.dumps({"n": 100 + i}).encode() + b"\n" for i in range(6)))
    assert path.read_bytes()[byte_offset(checkpoint) - 1 : byte_offset(checkpoint)] != b"\n"
    again = FileSource(str(path))
    again.resume_from({again.uri: checkpoint})
    again.open()
    assert numbers(poll_until(again, 6)[:6]) == list(range(100, 106))  # then the old bytes left over
    path.write_bytes(b'{"n": 0}\n{"n": 1}')  # no newline after the last line
    first = FileSource(str(path))
    first.open()
    end = poll_until(first, 2)[-1].next
    first.close()
    with open(path, "ab") as fh:
        fh.write(b'\n{"n": 2}\n')
    later = FileSource(str(path))
    later.resume_from({later.uri: end})
    later.open()
    assert numbers(poll_until(later, 1)) == [2]


def test_a_restart_reads_a_file_replaced_meanwhile_from_its_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The checkpoint's offset is one of another file (rotated while stopped, or before the
    switch was checkpointed): it must not skip the start of the file found now."""
    path = write_jsonl(tmp_path / "in.jsonl", [{"n": i, "pad": "x" * 40} for i in range(3)])
    source = FileSource(str(path))
    source.open()
    last = poll_until(source, 3)[-1].next
    source.close()
    path.rename(tmp_path / "in.jsonl.1")
    write_jsonl(path, [{"n": 100 + i, "pad": "y" * 60} for i in range(3)])  # longer than the old offset
    again = FileSource(str(path))
    again.resume_from({again.uri: last})
    with caplog.at_level(logging.WARNING, logger="dynft.sources.file"):
        again.open()
        got = poll_until(again, 3)
    assert numbers(got) == [100, 101, 102]
    assert got[0].next > last, "positions keep growing past the checkpoint's"
    assert any("another file than the checkpoint's" in r.message for r in caplog.records)
    plain = FileSource(str(path))  # a checkpoint from before positions kept the inode: a plain offset
    plain.resume_from({plain.uri: byte_offset(got[0].next)})
    plain.open()
    assert numbers(poll_until(plain, 2)) == [101, 102]


def test_a_file_rewritten_in_place_is_resumed_where_its_new_content_was_read_to(tmp_path: Path) -> None:
    """Read again from its top, a rewritten file's positions still grow (the checkpoint keeps the
    furthest): a restart resumes after the new content read, not at the old content's offset."""
    path = write_jsonl(tmp_path / "in.jsonl", [{"n": i, "pad": "x" * 40} for i in range(4)])
    source = FileSource(str(path), follow=True, poll_interval_s=0.02)
    source.open()
    before = poll_until(source, 4)
    write_jsonl(path, [{"n": 10 + i} for i in range(6)])  # rewritten, shorter lines
    after = poll_until(source, 6)
    source.close()
    assert numbers(after) == list(range(10, 16))
    assert after[0].next > before[-1].next
    with open(path, "ab") as fh:
        fh.write(b'{"n": 16}\n')
    again = FileSource(str(path), follow=True, poll_interval_s=0.02)
    again.resume_from({again.uri: max(r.next for r in before + after)})
    again.open()
    assert numbers(poll_until(again, 1)) == [16]
    again.close()


def test_follow_mode_reads_a_named_pipe_past_its_end(tmp_path: Path) -> None:
    """A FIFO cannot be rewritten or seeked: at its end (a writer closed it) the truncation check
    used to seek it and fail (ESPIPE)."""
    path = tmp_path / "in.fifo"
    os.mkfifo(path)

    def write() -> None:
        with open(path, "wb") as fh:
            fh.write(b'{"n": 0}\n')

    writer = threading.Thread(target=write)
    writer.start()
    source = FileSource(str(path), follow=True, poll_interval_s=0.02)
    source.open()  # blocks until the writer opens its end
    writer.join()
    assert [json.loads(r.raw)["n"] for r in source.poll(10, 0.2)] == [0]
    assert source.poll(10, 0.1) == [] and not source.exhausted
    source.close()


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


def test_an_over_long_line_on_stdin_is_one_cut_record(tmp_path: Path) -> None:
    """A pipe cannot be read back (``pread``): a cut line there once failed the source, and
    ``dynft run`` lost what the restarted trainer had read of the pipe."""
    script = (
        "import sys, json\n"
        "from dynft.sources import FileSource\n"
        "s = FileSource('-', max_record_bytes=100)\n"
        "s.open()\n"
        "print('open', flush=True)\n"
        "got = []\n"
        "while not s.exhausted:\n"
        "    got += [(len(r.raw), r.where, r.next) for r in s.poll(10, 0.1)]\n"
        "print(json.dumps(got))\n"
    )
    long_line = b'{"n": "' + b"x" * 5000 + b'"}\n'
    with subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline() == b"open\n"
        for part in (b'{"n": 1}\n' + long_line[:3000], long_line[3000:4000]):  # no newline yet: cut
            proc.stdin.write(part)
            proc.stdin.flush()
            time.sleep(0.5)
        out, _ = proc.communicate(long_line[4000:] + b'{"n": 2}\n', timeout=60)
        assert proc.returncode == 0
    first, cut, last = json.loads(out)
    assert first == [8, {"line": 1, "offset": 0}, 9]  # a pipe's positions are offsets
    assert cut == [101, {"line": 2, "offset": 9, "bytes": len(long_line) - 1}, 9 + len(long_line)]
    assert last == [8, {"line": 3, "offset": 9 + len(long_line)}, 18 + len(long_line)]


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


def test_an_over_long_line_is_cut_in_bounded_memory_and_the_next_line_is_read(tmp_path: Path) -> None:
    """A 20 MB line without a newline until its end, with records limited to 1 MiB: reading it
    never holds much more than the limit (tracemalloc's peak), the line becomes one record of
    ``limit + 1`` bytes (so the decoder dead-letters it as record_too_large), its real length is
    reported, and the line after it is read as usual."""
    limit = 1 << 20
    long_line = b'{"id": "x", "text": "' + b"a" * 20_000_000 + b'", "label": "y"}'
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"n": 0}\n' + long_line + b'\n{"n": 2}\n' + b"b" * (3 * limit))  # and a last one, cut too
    source = FileSource(str(path), max_record_bytes=limit)
    source.open()
    got = []
    tracemalloc.start()
    try:
        while not source.exhausted:
            got += source.poll(10, 0.1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * limit, f"reading a 20 MB line held {peak} bytes at once"
    assert [r.position["line"] for r in got] == [1, 2, 3, 4]
    assert got[0].raw == b'{"n": 0}' and got[2].raw == b'{"n": 2}'
    assert got[1].raw == long_line[: limit + 1] and got[1].position["bytes"] == len(long_line)
    assert got[3].raw == b"b" * (limit + 1) and got[3].position["bytes"] == 3 * limit
    ends = len(b'{"n": 0}\n') + len(long_line) + 1 + len(b'{"n": 2}\n')
    assert byte_offset(got[2].next) == ends, "offsets count every byte"
    rejection = decode(got[1].raw, EventSettings(max_record_bytes=limit))
    assert isinstance(rejection, Rejection) and rejection.reason == "record_too_large"


def test_lines_split_across_reads_keep_their_bytes_and_offsets(tmp_path: Path) -> None:
    """Lines of every length around the read size, with and without \\r: the same records as a plain split."""
    rows = [b"x" * n for n in (1, 100, 65535, 65536, 65537, 3, 200_000)] + [b'{"a": 1}\r', b"  ", b"z"]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(rows) + b"\n")
    source = FileSource(str(path))
    source.open()
    got = []
    while not source.exhausted:
        got += source.poll(3, 0.1)
    assert [r.raw for r in got] == [r.rstrip(b"\r") for r in rows if r.strip()]
    ends, at = [], 0
    for r in rows:
        at += len(r) + 1
        if r.strip():
            ends.append(at)
    assert [byte_offset(r.next) for r in got] == ends


def test_the_intake_queue_is_bounded_by_bytes(tmp_path: Path) -> None:
    """Records of 1 KiB, a queue of 1000 records but 64 KiB: the queue holds at most 64 KiB and
    the records the intake thread keeps besides it (a poll beyond a quarter of that) at most half
    of it; once taken, everything arrives in order."""
    rows = [{"n": i, "pad": "p" * 1000} for i in range(2000)]
    intake = Intake(FileSource(str(write_jsonl(tmp_path / "in.jsonl", rows))), max_queued=1000, max_bytes=64 << 10)
    intake.start()
    deadline = time.monotonic() + 20
    while not intake.paused:
        assert time.monotonic() < deadline, "the intake never paused its source"
        time.sleep(0.01)
    record = len(json.dumps(rows[0]))
    assert (64 << 10) - record < intake.queued_bytes <= 64 << 10
    assert intake.queued < 1000
    assert sum(len(r.raw) for r in intake._pending) < (32 << 10) + record
    got = []
    while not intake.finished and time.monotonic() < deadline:
        got += [json.loads(r.raw)["n"] for r in intake.take(50, 0.1)]
    intake.stop()
    assert got == list(range(2000))


@pytest.mark.slow
def test_dynft_run_trains_on_its_standard_input(tiny_settings: Settings, tmp_path: Path) -> None:
    """``dynft run --source file:-``: the trainer, a child forked from the fork server, reads the
    supervisor's standard input (multiprocessing gave it /dev/null, and every piped record was
    lost: 0 trained, the source exhausted at once)."""
    events = keyword_events(40, ["alpha", "beta"])
    log_path = tmp_path / "run.log"
    cmd = [sys.executable, "-m", "dynft", "run", "--model", str(tiny_settings.model.path), "--source", "file:-"]
    cmd += ["--state-dir", str(tmp_path / "state"), "--port", "0", "--set", "source.exit_at_end=true"]
    with log_path.open("wb") as log, subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=log) as proc:
        assert proc.stdin is not None
        try:
            proc.stdin.write(b"".join(json.dumps(e).encode() + b"\n" for e in events))
            proc.stdin.close()
            deadline = time.monotonic() + 240
            while "trainer finished" not in log_path.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                time.sleep(0.5)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
    ledger = subprocess.run(
        [sys.executable, "-m", "dynft", "ledger", "--state-dir", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        check=True,
    )
    counts = json.loads(ledger.stdout.strip().splitlines()[-1])
    assert counts["trained"] + counts["held_out"] == len(events), (counts, log_path.read_text()[-3000:])


def test_a_byte_order_mark_at_the_start_of_the_file_is_not_part_of_the_first_record(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    first = b'\xef\xbb\xbf{"id": "1", "text": "a", "label": "x"}\r\n'
    path.write_bytes(first + b'{"id": "2", "text": "\xef\xbb\xbfb", "label": "y"}\n')
    source = FileSource(str(path))
    source.open()
    records = source.poll(10, 0.1)
    events = [decode(r.raw, EventSettings()) for r in records]
    assert [e.id for e in events if not isinstance(e, Rejection)] == ["1", "2"]
    assert events[1].text == "\ufeffb", "only the file's first bytes are a byte order mark"  # type: ignore[union-attr]
    assert byte_offset(records[0].next) == len(first)  # positions count the mark's bytes
    cut = tmp_path / "cut.jsonl"  # a line cut at the size limit keeps its mark: still over the limit
    cut.write_bytes(b'\xef\xbb\xbf{"id": "1", "text": "' + b"a" * 300 + b'", "label": "x"}' + b" " * 200_000 + b"\n")
    source = FileSource(str(cut), max_record_bytes=256)
    source.open()
    (record,) = source.poll(10, 0.1)
    rejection = decode(record.raw, EventSettings(max_record_bytes=256))
    assert isinstance(rejection, Rejection) and rejection.reason == "record_too_large"


def test_a_restart_that_names_the_file_otherwise_resumes_where_the_last_run_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A probe restarted with ``file:./data/in.jsonl`` after ``file:data/in.jsonl`` (or an absolute
    path): the checkpoint's position was kept under the other spelling, and the whole file was
    trained again without a word. Positions are kept under the absolute path now; a checkpoint
    written before, under the spelling given then, is still found."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "in.jsonl", [{"n": n} for n in range(6)])
    first = FileSource("data/in.jsonl")
    first.open()
    got = first.poll(3, 0.1)
    first.close()
    positions = furthest(got)
    assert list(positions) == [f"file:{tmp_path / 'data' / 'in.jsonl'}"]
    for spelling, checkpoint in [
        ("./data/in.jsonl", positions),
        (str(tmp_path / "data" / "in.jsonl"), positions),
        ("data//in.jsonl", {"file:./data/in.jsonl": got[-1].next}),  # a checkpoint keyed as it was given
    ]:
        again = FileSource(spelling)
        again.resume_from(checkpoint)
        again.open()
        assert numbers(again.poll(10, 0.1)) == [3, 4, 5], spelling
        again.close()
    other = FileSource("data/in.jsonl")
    with caplog.at_level(logging.WARNING):
        other.resume_from({"file:elsewhere.jsonl": got[-1].next})
    assert "holds no position in this file (it read file:elsewhere.jsonl)" in caplog.text
    other.open()
    assert numbers(other.poll(10, 0.1)) == [0, 1, 2, 3, 4, 5]
    other.close()


def test_a_fifo_without_a_writer_is_waited_for_without_blocking_and_read_once_one_comes(tmp_path: Path) -> None:
    """A FIFO's open waited for a writer: a FIFO without one held the trainer before its loop, and
    past its SIGTERM (the next test)."""
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    source = FileSource(str(fifo))
    started = time.monotonic()
    source.open()
    assert time.monotonic() - started < 1
    assert source.poll(10, 0.2) == [] and not source.exhausted  # no writer yet: nothing, and not the end
    with open(fifo, "wb") as writer:
        writer.write(b'{"n": 1}\n{"n": 2}\n')
    got = poll_until(source, 2)
    assert numbers(got) == [1, 2]
    deadline = time.monotonic() + 5
    while not source.exhausted and time.monotonic() < deadline:
        assert source.poll(10, 0.1) == []
    assert source.exhausted  # its writer gone: the end of the stream
    source.close()


@pytest.mark.slow
def test_dynft_train_on_a_fifo_without_a_writer_stops_at_sigterm(tiny_settings: Settings, tmp_path: Path) -> None:
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    log_path = tmp_path / "train.log"
    cmd = [sys.executable, "-m", "dynft", "train", "--model", str(tiny_settings.model.path), "--source", f"file:{fifo}"]
    cmd += ["--state-dir", str(tmp_path / "state"), "--set", "run.status_interval_s=0.5"]
    with log_path.open("wb") as log, subprocess.Popen(cmd, stderr=log) as proc:
        try:
            deadline = time.monotonic() + 120
            while "events 0" not in log_path.read_text():  # the status line: the loop runs
                assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text()[-3000:]
                time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, log_path.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
