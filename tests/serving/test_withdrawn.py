"""A request whose client has gone is withdrawn: never computed, holding no place in the queue.

Found by a probe: thirty requests of 32 texts whose clients closed their sockets after a second
were computed anyway, each until the request timeout, and a one-text request behind them waited
30 s; clients that retried on a timeout filled the queue with requests nobody read, and the
server answered nearly every live one 503 ``overloaded``.

Over real sockets against a real server. A forward pass of a tiny model takes milliseconds, so
the slow one that makes requests queue is injected: the worker's round waits for the test.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from dynft.model import AdapterState
from dynft.registry import AdapterRegistry
from dynft.serving.server import Server
from dynft.settings import Settings

from serving.conftest import PROBE, running_server, wait_for_version


def predict_request(texts: list[str]) -> bytes:
    body = json.dumps({"texts": texts}).encode()
    head = "POST /v1/predict HTTP/1.1\r\nHost: dynft\r\nContent-Type: application/json\r\n"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


class HeldWorker:
    """The engine's rounds, held until released, and the texts of every request each computed."""

    def __init__(self, server: Server) -> None:
        self.release = threading.Event()
        self.computed: list[list[str]] = []
        self._serve = server.engine._serve

    def __call__(self, batch: list[Any]) -> None:
        if batch:
            self.release.wait(60)
            self.computed += [p.texts for p in batch]
        self._serve(batch)


@pytest.fixture
def served(tiny_settings: Settings, versions: dict[int, AdapterState]) -> Iterator[tuple[str, Server]]:
    AdapterRegistry(tiny_settings.registry_dir, keep_last=100).promote(13, "start")
    tiny_settings.server.max_texts = 4
    tiny_settings.server.max_queue = 12
    with running_server(tiny_settings) as (base, server):
        wait_for_version(base, 13)
        yield base, server


def requests_total(client: httpx.Client, status: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'dynft_requests_total{{status="{status}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_requests_of_clients_that_left_are_never_computed_and_free_their_place(
    served: tuple[str, Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, server = served
    held = HeldWorker(server)
    monkeypatch.setattr(server.engine, "_serve", held)
    host, port = base.removeprefix("http://").split(":")
    with httpx.Client(base_url=base, timeout=60) as client:
        busy = threading.Thread(target=lambda: client.post("/v1/predict", json={"texts": ["the first"]}))
        busy.start()  # the worker holds this one's round
        time.sleep(0.3)
        leaving = [socket.create_connection((host, int(port))) for _ in range(3)]
        for i, sock in enumerate(leaving):  # 12 texts: the queue (server.max_queue) is full
            sock.sendall(predict_request([f"abandoned {i} {j}" for j in range(4)]))
        time.sleep(0.5)
        with httpx.Client(base_url=base, timeout=60) as other:
            full = other.post("/v1/predict", json={"texts": [PROBE]})
        assert full.status_code == 503 and full.json()["error"]["code"] == "overloaded", full.text
        for sock in leaving:
            sock.close()
        deadline = time.monotonic() + 30
        while requests_total(client, "499") < 3:  # the server saw each client leave
            assert time.monotonic() < deadline, "the departures were never counted"
            time.sleep(0.05)
        # Their places are free before the worker has taken anything more from the queue.
        live: dict[str, Any] = {}
        with httpx.Client(base_url=base, timeout=60) as another:
            late = threading.Thread(
                target=lambda: live.update(another.post("/v1/predict", json={"texts": [PROBE]}).json())
            )
            late.start()
            time.sleep(0.3)
            held.release.set()
            busy.join(60)
            late.join(60)
        assert live["adapter_version"] == 13, live
        assert held.computed == [["the first"], [PROBE]]  # nothing of the three that left
        assert server.engine.requests.texts == 0
        assert requests_total(client, "422") == 0


def test_a_client_that_leaves_during_its_body_is_not_counted_as_a_bad_request(served: tuple[str, Server]) -> None:
    base, _ = served
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(predict_request(["a text that never ends"])[:-5])
    time.sleep(0.3)
    sock.close()
    with httpx.Client(base_url=base, timeout=30) as client:
        deadline = time.monotonic() + 30
        while requests_total(client, "499") < 1:
            assert time.monotonic() < deadline, "the departure was never counted"
            time.sleep(0.05)
        assert requests_total(client, "422") == 0
        assert client.post("/v1/predict", json={"texts": [PROBE]}).json()["adapter_version"] == 13


def test_responses_in_flight_at_a_shutdown_say_the_connection_closes(
    tiny_settings: Settings, versions: dict[int, AdapterState], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a probe: at SIGTERM every in-flight request was answered, without
    ``Connection: close``, and the kept-alive client's next request on it was reset."""
    AdapterRegistry(tiny_settings.registry_dir, keep_last=100).promote(13, "start")
    with running_server(tiny_settings) as (base, server):
        wait_for_version(base, 13)
        held = HeldWorker(server)
        monkeypatch.setattr(server.engine, "_serve", held)
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.settimeout(30)
            sock.sendall(predict_request(["in flight"]))
            time.sleep(0.3)
            server.stop()  # as SIGTERM does
            time.sleep(0.3)
            held.release.set()
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        head = answer.partition(b"\r\n\r\n")[0].lower()
        assert head.startswith(b"http/1.1 200") and b"connection: close" in head, answer
