"""A server that looks up must be serving: one failure in the watcher or the worker stops neither.

The watcher's case is real (a damaged ``serving.json`` of one task). The worker's is injected
(``Failing``): every failure known to reach it is handled where it happens, so an unforeseen
one can only be made up; the test says what the worker does with it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from dynft.metrics import ServerMetrics
from dynft.model import AdapterState
from dynft.registry import AdapterRegistry
from dynft.serving.answers import Answer, NotReady
from dynft.serving.engine import NOT_READY_AFTER, InferenceEngine
from dynft.serving.server import Server
from dynft.settings import Settings
from dynft.tasks import task_registry_dir

from serving.conftest import PROBE, running_server, wait_for_version
from serving.test_tasks_serving import intents  # noqa: F401  (a fixture: task "intents", versions 1-5)


def engine_for(settings: Settings, kind: type[InferenceEngine] = InferenceEngine) -> InferenceEngine:
    return kind(settings, AdapterRegistry(settings.registry_dir), ServerMetrics(CollectorRegistry()))


def wait_for(condition: Any, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_damaged_pointer_of_one_task_keeps_no_other_task_from_its_new_version(
    tiny_settings: Settings,
    versions: dict[int, AdapterState],
    intents: dict[int, AdapterState],  # noqa: F811
) -> None:
    tiny_settings.server.poll_interval_s = 0.1
    default = AdapterRegistry(tiny_settings.registry_dir, keep_last=100)
    default.promote(13, "start")
    other = AdapterRegistry(task_registry_dir(tiny_settings.registry_dir, "intents"), keep_last=100)
    other.promote(2, "start")
    engine = engine_for(tiny_settings)
    engine.start()
    try:
        wait_for(lambda: engine.serving == {"default": 13, "intents": 2}, "both tasks to serve")
        default.pointer_path.write_text("{not json")  # the first lane the watcher looks at
        other.promote(4, "next")
        wait_for(lambda: engine.serving.get("intents") == 4, "the other task's new version")
        assert engine.serving["default"] == 13  # what was loaded goes on answering
        answer = engine.submit([PROBE], "default").result(timeout=30)
        assert answer.version == 13
    finally:
        engine.stop()


def test_a_task_whose_pointer_is_damaged_before_any_version_loaded_says_so(
    tiny_settings: Settings,
    versions: dict[int, AdapterState],
    intents: dict[int, AdapterState],  # noqa: F811
) -> None:
    """Found by a probe: the answer was "no adapter version is serving yet", as if none had been
    promoted; the admin endpoints said registry_unreadable."""
    tiny_settings.server.poll_interval_s = 0.1
    AdapterRegistry(tiny_settings.registry_dir, keep_last=100).promote(13, "start")
    other = AdapterRegistry(task_registry_dir(tiny_settings.registry_dir, "intents"), keep_last=100)
    other.pointer_path.write_text("{not json")
    engine = engine_for(tiny_settings)
    engine.start()
    try:
        wait_for(lambda: engine.serving.get("default") == 13, "the default task to serve")
        wait_for(lambda: "intents" in engine.lanes and engine.lanes["intents"].unreadable, "the damage seen")
        with pytest.raises(NotReady, match=r"for task intents \(its serving pointer cannot be read"):
            engine.submit([PROBE], "intents")
        other.pointer_path.unlink()  # moved aside, as the message says: the task serves, and the note is gone
        other.promote(2, "repaired")
        wait_for(lambda: engine.serving.get("intents") == 2, "the repaired task to serve")
        assert not engine.lanes["intents"].unreadable
    finally:
        engine.stop()


class Failing(InferenceEngine):
    """Fails its next ``failures`` rounds that have requests, as an unforeseen bug would (injected: see the module)."""

    failures = 0

    def _serve(self, batch: list[Any]) -> None:
        if batch and self.failures:
            self.failures -= 1
            raise RuntimeError("an unforeseen failure")
        super()._serve(batch)


def test_the_worker_fails_the_requests_of_a_round_that_failed_and_answers_the_next(
    tiny_settings: Settings, versions: dict[int, AdapterState], caplog: pytest.LogCaptureFixture
) -> None:
    AdapterRegistry(tiny_settings.registry_dir, keep_last=100).promote(13, "start")
    engine = engine_for(tiny_settings, Failing)
    assert isinstance(engine, Failing)
    engine.start()
    try:
        wait_for(lambda: engine.ready, "a version to serve")
        engine.failures = 1
        first: Future[Answer] = engine.submit([PROBE])
        with pytest.raises(RuntimeError, match="unforeseen"):
            first.result(timeout=30)  # its client is told at once, not left to time out
        assert engine.ready  # one failed round: the worker is still there, and ready
        assert engine.submit([PROBE]).result(timeout=30).version == 13
        engine.failures = NOT_READY_AFTER
        for _ in range(NOT_READY_AFTER):
            with pytest.raises(RuntimeError):
                engine.submit([PROBE]).result(timeout=30)
        assert not engine.ready  # failing round after round: /readyz takes the server out of rotation
        assert engine.submit([PROBE]).result(timeout=30).version == 13
        assert engine.ready  # and back once a round succeeds
        said = [r for r in caplog.records if "inference worker failed" in r.getMessage()]
        assert len(said) == 2, said  # once per run of the same failure, not once per round
    finally:
        engine.stop()


@pytest.fixture
def served(tiny_settings: Settings, versions: dict[int, AdapterState]) -> Iterator[tuple[httpx.Client, Server]]:
    """A real server on loopback serving version 13, and a keep-alive client of it."""
    AdapterRegistry(tiny_settings.registry_dir, keep_last=100).promote(13, "start")
    with running_server(tiny_settings) as (base, server), httpx.Client(base_url=base, timeout=30) as client:
        wait_for_version(base, 13)
        yield client, server


def test_readyz_takes_a_server_whose_worker_keeps_failing_out_and_back_over_http(
    served: tuple[httpx.Client, Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, server = served
    serve = server.engine._serve

    def failing(batch: list[Any]) -> None:  # injected, as in ``Failing``; idle rounds pass
        if batch:
            raise RuntimeError("an unforeseen failure")
        serve(batch)

    monkeypatch.setattr(server.engine, "_serve", failing)
    for _ in range(NOT_READY_AFTER):
        answer = client.post("/v1/predict", json={"texts": [PROBE]})
        assert answer.status_code == 500 and answer.json()["error"]["code"] == "internal", answer.text
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "keeps failing" in ready.text, ready.text
    assert "unforeseen" not in ready.text  # the error's text stays in the log
    monkeypatch.undo()
    assert client.post("/v1/predict", json={"texts": [PROBE]}).json()["adapter_version"] == 13
    assert client.get("/readyz").status_code == 200


def test_an_unforeseen_error_in_any_route_is_a_500_and_the_connection_serves_on(
    served: tuple[httpx.Client, Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Injected (no real input is known to raise there): ``/v1/tasks`` meets a broken engine."""
    client, server = served
    monkeypatch.setattr(server.engine, "lanes", None)
    broken = client.get("/v1/tasks")
    assert broken.status_code == 500 and broken.json()["error"]["code"] == "internal", broken.text
    monkeypatch.undo()
    assert client.get("/v1/tasks").status_code == 200  # the same keep-alive connection
    assert client.post("/v1/predict", json={"texts": [PROBE]}).json()["adapter_version"] == 13
