"""The trainer process: one training loop, or (``kafka.sharded``) a loop per *life*.

A sharded trainer's tasks are those keyed to the partitions its election term holds
(``dynft.election``). When the group assigns the partitions anew (a trainer joined, left or
died), the loop ends (``TrainingLoop.reassigned``) and a new one starts over the new partitions,
resuming every task from its newest published version. The election outlives the lives: its
group membership is what keeps the assignment where it is, so ending a life moves no partition
(a process exit would leave the group and move the others' partitions too).

Metrics: each life registers its metrics in a fresh registry (a loop's metric objects are its
own); ``CurrentLife`` hands the scrape the current life's, under unchanged names, so a counter
restarts from zero at a new life as it would at a restart of the process.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from dynft.election import Election
from dynft.loop import TrainingLoop
from dynft.settings import Settings

log = logging.getLogger(__name__)


class CurrentLife:
    """A collector that yields the current life's metrics (registered once in the scraped registry)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

    def collect(self) -> Iterator[Metric]:
        yield from self.registry.collect()

    def describe(self) -> list[Metric]:
        return []  # names vary by life; none is checked for duplicates at registration


def run_lives(settings: Settings, served: CollectorRegistry, colocated: bool = False) -> None:
    """Train until SIGINT / SIGTERM (or a finite source's end): one loop, or one per sharded life."""
    current = CurrentLife()
    served.register(current)  # type: ignore[arg-type]
    stopping = threading.Event()
    loop: TrainingLoop | None = None

    def stop(signum: int, frame: Any) -> None:
        log.info("received %s; finishing the step and publishing", signal.Signals(signum).name)
        stopping.set()
        if loop is not None:
            loop.should_exit.set()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    election = Election(settings, f"{socket.gethostname()}:{os.getpid()}") if settings.kafka.election else None
    try:
        if election is not None:
            election.start()
        while not stopping.is_set():
            current.registry = CollectorRegistry()
            loop = TrainingLoop(settings, current.registry, colocated=colocated, election=election)
            if stopping.is_set():  # a signal between the check and the new loop
                loop.should_exit.set()
            loop.run()
            if not loop.reassigned:
                break
            log.info("starting the trainer's next life over the partitions it holds now")
    finally:
        if election is not None:
            election.close()  # leaves the group: a standby takes over at once
        for sig, handler in previous.items():
            signal.signal(sig, handler)
