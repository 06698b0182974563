"""The memory benchmark's measure: resident pages of a group of processes, each counted once."""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

import pytest

from benchmarks.memory import distinct_mib

MIB = 1 << 20


def _hold(buffer: bytearray, write: bool, ready: Any, done: Any) -> None:
    if write:  # copy-on-write: every page becomes the child's own
        for i in range(0, len(buffer), 4096):
            buffer[i] = 2
    ready.send(True)
    done.recv()


@pytest.mark.parametrize("write", [False, True])
def test_pages_shared_after_a_fork_count_once_and_written_pages_count_twice(write: bool) -> None:
    # resident: every byte written. 128 MiB: a forked child of a large test process (torch loaded)
    # copies some tens of MiB of the parent's heap by itself (reference counts, the collector), which
    # a 64 MiB buffer's margins did not always leave room for (a fresh-clone run: +33 MiB against +32).
    buffer = bytearray(b"\1" * (128 * MIB))
    alone = distinct_mib([os.getpid()])
    if alone is None:
        pytest.skip("frame numbers are hidden from this user (they need CAP_SYS_ADMIN)")
    ctx = multiprocessing.get_context("fork")  # the child shares the buffer's pages until it writes
    ready_recv, ready_send = ctx.Pipe(duplex=False)
    done_recv, done_send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_hold, args=(buffer, write, ready_send, done_recv))
    child.start()
    try:
        assert ready_recv.recv()
        parent = distinct_mib([os.getpid()])  # read together: the parent's heap may have changed since
        child_alone = distinct_mib([child.pid or 0])
        pair = distinct_mib([os.getpid(), child.pid or 0])
    finally:
        done_send.send(True)
        child.join()
    assert alone >= 128 and parent is not None and child_alone is not None and pair is not None
    assert child_alone >= 128, (alone, parent, child_alone, pair)  # the child maps the buffer's pages either way
    if write:
        assert pair >= parent + 120, (alone, parent, child_alone, pair)  # the child's copy counts on its own
    else:  # a sum over the two would count the buffer twice (+128 or more); its pages count once
        assert pair < parent + 64, (alone, parent, child_alone, pair)
