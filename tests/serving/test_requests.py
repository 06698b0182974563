"""The engine's request queue: bounded by texts and by the time its work would take; withdrawn
requests hold no place. Without threads: the worker's side is called directly."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest

from dynft.serving.answers import Answer, Overloaded, Pending
from dynft.serving.requests import WARM_UP_ROUNDS, RequestQueue
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
    for _ in range(WARM_UP_ROUNDS):  # nor do the first full ones
        queue.measure(32, 10.0)
    assert queue.texts_per_s == 0
    queue.measure(32, 0.5)  # 64 texts/s: 2 s of work is 128 texts
    assert queue.texts_per_s == 64
    queue.put(pending(1))  # 128 texts before it: 2 s, not more
    with pytest.raises(Overloaded, match=r"about 2 s of work at 64 texts/s"):
        queue.put(pending(1))
    assert [len(p.texts) for p in queue.collect()] == [32]
    queue.put(pending(32))  # room again
    assert queue.texts == 129


def test_a_rate_measured_too_low_never_refuses_a_request_to_an_empty_queue() -> None:
    """Only the work before a request counts: one that alone would take longer is still taken, so
    rounds run and correct the rate (counting its own texts, a size was refused for good)."""
    queue = RequestQueue(ServerSettings(max_batch=32, request_timeout_s=1.0))
    for _ in range(WARM_UP_ROUNDS + 1):
        queue.measure(16, 10.0)  # 1.6 texts/s
    queue.put(pending(20))
    assert queue.texts == 20


def test_a_request_put_while_a_batch_is_collected_is_counted_once() -> None:
    """Found by a review: texts were taken off the count only when a collected batch was complete,
    so a put that found the queue full meanwhile recounted it without them, and the count went
    below zero (max_queue no longer bounded the queue)."""
    queue = RequestQueue(ServerSettings(max_batch=32, max_texts=32, max_queue=40, max_wait_ms=300.0))
    queue.put(pending(20))
    first: list[Pending] = []
    collecting = threading.Thread(target=lambda: first.extend(queue.collect()))
    collecting.start()  # takes the 20 and waits up to 300 ms for company
    time.sleep(0.1)
    assert queue.texts == 0  # the batch being collected holds no place
    queue.put(pending(30))  # 30 of 40: taken (it once found 50, dropped the withdrawn, and recounted to 30)
    collecting.join(5)
    assert [len(p.texts) for p in first] == [20]
    assert queue.texts == 30
    assert [len(p.texts) for p in queue.collect()] == [30] and queue.texts == 0


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
