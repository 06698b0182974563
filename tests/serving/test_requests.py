"""The engine's request queue: bounded by texts and by the time its work would take; withdrawn
requests hold no place. Without threads: the worker's side is called directly."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from dynft.serving.answers import Answer, Overloaded, Pending
from dynft.serving.requests import RequestQueue
from dynft.settings.sections import ServerSettings


def pending(n: int) -> Pending:
    future: Future[Answer] = Future()
    return Pending([f"text {i}" for i in range(n)], future)


def test_work_longer_than_the_request_timeout_is_refused_at_once() -> None:
    """Found by a probe: 4,096 texts (the default max_queue) are 2-3 minutes of work on a CPU, so
    most overloaded clients waited the whole 30 s for a 504 instead of getting a 503 at once."""
    queue = RequestQueue(ServerSettings(max_batch=32, request_timeout_s=2.0))
    for _ in range(4):
        queue.put(pending(32))  # throughput not measured yet: only max_queue bounds it
    queue.measure(8, 1.0)  # a small round says nothing of full ones
    assert queue.texts_per_s == 0
    queue.measure(32, 0.5)  # 64 texts/s: 2 s of work is 128 texts
    assert queue.texts_per_s == 64
    with pytest.raises(Overloaded, match=r"about 2 s of work at 64 texts/s"):
        queue.put(pending(1))
    assert [len(p.texts) for p in queue.collect()] == [32]
    queue.put(pending(32))  # room again
    assert queue.texts == 128


def test_withdrawn_requests_are_never_collected_and_free_their_place() -> None:
    queue = RequestQueue(ServerSettings(max_batch=32, max_texts=8, max_queue=16))
    first, gone, last = pending(8), pending(8), pending(4)
    queue.put(first)
    queue.put(gone)
    with pytest.raises(Overloaded):
        queue.put(last)
    gone.future.cancel()  # its client left
    queue.put(last)  # its place is free at once
    assert queue.collect() == [first, last] and queue.texts == 0
    first.future.cancel()
    queue.put(first)
    assert queue.collect() == [] and queue.texts == 0
