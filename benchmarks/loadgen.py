"""A closed-loop load generator for the inference engine: N clients, one request in flight each."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

from dynft.serving.engine import InferenceEngine


@dataclass
class Answered:
    sent: float  # time.time() when submitted
    seconds: float  # latency
    version: int


@dataclass
class Load:
    """What the clients saw; ``answers`` in completion order per client, ``failures`` as repr strings."""

    answers: list[Answered] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    started: float = 0.0
    stopped: float = 0.0

    @property
    def seconds(self) -> float:
        return self.stopped - self.started

    def latencies(self) -> list[float]:
        return [a.seconds for a in self.answers]


class LoadGenerator:
    """``clients`` threads that send ``texts_per_request`` demo texts per request until stopped."""

    def __init__(
        self,
        engine: InferenceEngine,
        texts: list[str],
        clients: int,
        texts_per_request: int = 1,
        tasks: list[str] | None = None,
    ) -> None:
        self.engine, self.texts, self.clients, self.per_request = engine, texts, clients, texts_per_request
        self.tasks = tasks or ["default"]  # each client's requests cycle through them, from its own offset
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.load = Load()

    def start(self) -> None:
        self._stop.clear()
        self.load = Load(started=time.time())
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> Load:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        self.load.stopped = time.time()
        return self.load

    def run_for(self, seconds: float) -> Load:
        self.start()
        time.sleep(seconds)
        return self.stop()

    def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        sent_so_far = seed
        while not self._stop.is_set():
            texts = [rng.choice(self.texts) for _ in range(self.per_request)]
            task = self.tasks[sent_so_far % len(self.tasks)]
            sent_so_far += 1
            sent, started = time.time(), time.perf_counter()
            try:
                answer = self.engine.submit(texts, task).result(timeout=30)
            except Exception as exc:  # every failure counts, whatever its kind
                with self._lock:
                    self.load.failures.append(repr(exc))
                continue
            with self._lock:
                self.load.answers.append(Answered(sent, time.perf_counter() - started, answer.version))
