"""Slow clients and broken state cannot take the server down or make it talk too much.

Over real sockets against a real server: a body that stalls or trickles gets 408 and a closed
connection at ``server.body_timeout_s`` while other requests are served; at most
``server.limit_concurrency`` connections are served at once, new ones beyond them get 503
``overloaded`` at once while those served keep being served; the 503 bodies of
``/v1/adapters`` carry no path or OS error (those go to the server log).
"""

from __future__ import annotations

import asyncio
import json
import logging
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from dynft.model import AdapterState
from dynft.registry import AdapterRegistry
from dynft.serving.limits import make_head_deadline
from dynft.serving.server import Server
from dynft.settings import Settings

from serving.conftest import TOKEN, running_server

STALLED = (
    b"POST /v1/predict HTTP/1.1\r\nHost: dynft\r\nContent-Type: application/json\r\n"
    b"Content-Length: 100\r\n\r\n"
    b'{"texts": ["w'
)


@pytest.fixture
def server(tiny_settings: Settings) -> Iterator[str]:
    tiny_settings.server.body_timeout_s = 1.0
    tiny_settings.server.header_timeout_s = 1.0
    tiny_settings.server.limit_concurrency = 4
    with running_server(tiny_settings) as (base, _):
        yield base


def connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.settimeout(30)  # only a guard against hanging the suite: the server must answer long before
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


@pytest.mark.parametrize("trickle", [False, True], ids=["stalled", "trickling"])
def test_a_slow_body_gets_408_and_a_closed_connection_while_others_are_served(server: str, trickle: bool) -> None:
    with connect(server) as slow, httpx.Client(base_url=server, timeout=30) as client:
        slow.sendall(STALLED)
        if trickle:  # one byte every 0.2 s, each well inside the deadline: the deadline is for the whole body
            for _ in range(150):  # 30 s: a guard only, the server answers after 1 s
                assert client.get("/healthz").json() == {"status": "ok"}  # others are served meanwhile
                if select.select([slow], [], [], 0.2)[0]:  # the answer is there: stop sending
                    break
                slow.sendall(b"1")
        else:
            assert client.get("/healthz").json() == {"status": "ok"}
        answer = read_until_closed(slow)  # returns only once the server closes the connection
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert b'"code":"body_timeout"' in body and b"within 1.0 s" in body


HEAD = b"GET /v1/tasks HTTP/1.1\r\nHost: dynft\r\n\r\n"  # not a probe: those are answered past the limit


@pytest.mark.parametrize("client", ["silent", "trickling", "idle-after-a-response"])
def test_a_connection_without_a_whole_request_head_is_closed_at_header_timeout(server: str, client: str) -> None:
    """A review held ``limit_concurrency`` connections open without a byte (or a head a byte
    every 2 s) and every other client got 503 for as long as they liked; uvicorn's keep-alive
    timer starts only after a response. Each head now has ``server.header_timeout_s`` (1 s here)."""
    with connect(server) as sock:
        start = time.monotonic()
        if client == "idle-after-a-response":  # kept alive: a second request in time is served
            for pause in (0.5, 0.0):
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: dynft\r\n\r\n")
                answer = b""
                while not answer.endswith(b'{"status":"ok"}'):
                    answer += sock.recv(4096)
                assert answer.startswith(b"HTTP/1.1 200")
                start = time.monotonic()  # the next head's deadline runs from this response
                time.sleep(pause)
        elif client == "trickling":  # every byte well inside the deadline: it is for the whole head
            for byte in HEAD[:-2]:
                if select.select([sock], [], [], 0.2)[0]:
                    break
                sock.sendall(bytes([byte]))
        assert read_until_closed(sock) == b"", "closed without an answer: there was no request"
        assert 0.9 <= time.monotonic() - start < 10


def test_past_limit_concurrency_new_requests_get_503_at_once(server: str) -> None:
    idle = [connect(server) for _ in range(4)]  # open connections that send nothing
    try:
        deadline = time.monotonic() + 30
        while True:  # the server accepts them in its own time; then a new connection is refused
            with httpx.Client(base_url=server, timeout=30) as client:
                r = client.get("/v1/tasks")
            if r.status_code == 503:
                break
            assert r.status_code == 200 and time.monotonic() < deadline, "never refused past limit_concurrency"
            time.sleep(0.05)
        assert r.json()["error"]["code"] == "overloaded" and r.headers["connection"] == "close"
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 30
    while True:  # freed again: served again
        with httpx.Client(base_url=server, timeout=30) as client:
            if client.get("/v1/tasks").status_code == 200:
                break
        assert time.monotonic() < deadline, "still refusing after the idle connections closed"
        time.sleep(0.05)


LIMIT = 4


@pytest.fixture
def limited(tiny_settings: Settings) -> Iterator[tuple[str, Server]]:
    """A server of ``LIMIT`` connections whose idle connections stay open for the test's length."""
    tiny_settings.server.header_timeout_s = 30.0
    tiny_settings.server.limit_concurrency = LIMIT
    with running_server(tiny_settings) as running:
        yield running


def opened(server: Server, n: int) -> None:
    """Waits until the server has accepted ``n`` connections (it accepts them in its own time)."""
    deadline = time.monotonic() + 30
    while len(server.uvicorn.server_state.connections) < n:
        assert time.monotonic() < deadline, f"the server never had {n} connections"
        time.sleep(0.01)


def exchange(sock: socket.socket, request: bytes = HEAD) -> tuple[int, dict[str, str], bytes]:
    """One request on a kept-alive connection: the answer's status, headers and body."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"closed without a whole answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(4096)
        assert chunk, f"closed within the body: {data!r}"
        body += chunk
    return int(status.split()[1]), headers, body


def assert_refused(sock: socket.socket) -> None:
    """The documented refusal: 503 ``overloaded``, try again in 1 s, and the connection closed."""
    status, headers, body = exchange(sock)
    assert status == 503, body
    assert json.loads(body)["error"]["code"] == "overloaded"
    assert headers["connection"] == "close" and headers["retry-after"] == "1"
    assert read_until_closed(sock) == b""


def test_idle_connections_below_the_limit_do_not_refuse_an_established_client(
    limited: tuple[str, Server],
) -> None:
    """Found by a probe: at a limit of 20, 19 connections that never sent a byte made every
    request of a client already served get 503 until they were closed at header_timeout_s;
    uvicorn counted them at every request head. Connections are admitted once, when they open."""
    base, server = limited
    with connect(base) as client:
        assert exchange(client)[0] == 200
        idle = [connect(base) for _ in range(LIMIT - 1)]
        try:
            opened(server, LIMIT)
            for _ in range(10):
                status, _, body = exchange(client)
                assert status == 200, body
        finally:
            for sock in idle:
                sock.close()


def test_the_limit_is_reachable(limited: tuple[str, Server]) -> None:
    """Found by a probe: a burst of exactly 20 connections at a limit of 20 got 20 503s."""
    base, server = limited
    socks = [connect(base) for _ in range(LIMIT)]
    try:
        opened(server, LIMIT)
        assert [exchange(sock)[0] for sock in socks] == [200] * LIMIT
        assert [exchange(sock)[0] for sock in socks] == [200] * LIMIT  # and kept being served
    finally:
        for sock in socks:
            sock.close()


def test_past_the_limit_only_the_new_connections_are_refused(limited: tuple[str, Server]) -> None:
    """Found by a probe: a burst of 25 at a limit of 20 got 25 503s, not just the 5 beyond it.
    The first ``LIMIT`` connections are served (and stay served); the others are refused."""
    base, server = limited
    socks = [connect(base) for _ in range(LIMIT + 3)]
    try:
        opened(server, LIMIT + 3)
        served, refused = socks[:LIMIT], socks[LIMIT:]  # loopback connections are accepted in order
        for sock in refused:
            assert_refused(sock)
        for sock in served:
            for _ in range(2):
                assert exchange(sock)[0] == 200
    finally:
        for sock in socks:
            sock.close()
    with httpx.Client(base_url=base, timeout=30) as client:  # room again: a new connection is served
        deadline = time.monotonic() + 30
        while (status := client.get("/v1/tasks").status_code) != 200:
            assert status == 503 and time.monotonic() < deadline
            time.sleep(0.05)


@pytest.mark.parametrize("probe", [b"GET /healthz", b"GET /readyz", b"GET /metrics"])
def test_past_the_limit_probes_and_scrapes_are_answered_and_closed(limited: tuple[str, Server], probe: bytes) -> None:
    """Found by a probe: 260 idle connections made every /healthz a 503, which the shipped liveness
    probe turns into a restart of a server that works, and Prometheus lost its scrapes."""
    base, server = limited
    socks = [connect(base) for _ in range(LIMIT + 2)]
    try:
        opened(server, LIMIT + 2)
        status, headers, _ = exchange(socks[LIMIT], probe + b" HTTP/1.1\r\nHost: dynft\r\n\r\n")
        assert status in (200, 503) and headers["connection"] == "close"  # /readyz: 503 before a version
        assert status == 200 or probe == b"GET /readyz"
        assert read_until_closed(socks[LIMIT]) == b""
        assert_refused(socks[LIMIT + 1])  # anything else is refused as before
    finally:
        for sock in socks:
            sock.close()


def test_refusals_are_counted_and_logged_once_per_interval(
    limited: tuple[str, Server], caplog: pytest.LogCaptureFixture
) -> None:
    """Found by a probe: refusals were missing from dynft_requests_total and each logged a
    line (thousands of them under load)."""
    caplog.set_level(logging.WARNING, logger="dynft.serving.limits")
    base, server = limited
    socks = [connect(base) for _ in range(LIMIT + 3)]
    try:
        opened(server, LIMIT + 3)
        for sock in socks[LIMIT:]:
            assert_refused(sock)
        status, _, body = exchange(socks[0], b"GET /metrics HTTP/1.1\r\nHost: dynft\r\n\r\n")
    finally:
        for sock in socks:
            sock.close()
    assert status == 200
    scraped = body.decode()
    assert 'dynft_requests_total{status="503"} 3.0' in scraped
    assert 'dynft_connections_refused_total{how="503"} 3.0' in scraped
    logged = [r.getMessage() for r in caplog.records if r.name == "dynft.serving.limits"]
    assert len(logged) == 1 and "server.limit_concurrency=4" in logged[0], logged


@pytest.mark.parametrize(
    "request_",
    [
        b"GET /healthz HTTP/1.1\r\nHost: dynft\r\nContent-Length: 100\r\n\r\n",  # a GET reads no body
        b"POST /v1/predict HTTP/1.1\r\nHost: dynft\r\nContent-Length: 99999999\r\n\r\n",  # 413 by its length
        b"POST /v1/adapters/unpin HTTP/1.1\r\nHost: dynft\r\nContent-Length: 100\r\n\r\n",  # 401 unread
    ],
    ids=["get-with-a-body", "413", "401"],
)
def test_a_connection_answered_before_its_body_was_read_is_closed_at_header_timeout(
    server: str, request_: bytes
) -> None:
    """Found by a probe: a byte of the unread body after the answer cancelled uvicorn's keep-alive
    timer, and no deadline was left (the head's had ended with the head, the body's with the app),
    so such connections were held for ever and 255 of them locked every client out (503)."""
    with connect(server) as sock:
        sock.sendall(request_)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(4096)
        assert answer.startswith((b"HTTP/1.1 200", b"HTTP/1.1 413", b"HTTP/1.1 401")), answer
        start = time.monotonic()
        time.sleep(0.3)
        sock.sendall(b"x")  # a byte of the body it declared, now and then
        read_until_closed(sock)  # the 30 s socket timeout fails the test if the server never closes
        assert time.monotonic() - start < 10


def test_a_body_framed_both_by_length_and_by_chunks_is_refused(server: str) -> None:
    """Found by a probe: it was read as chunked; a proxy in front that reads the length instead
    would see other requests on the connection than the server (request smuggling)."""
    with connect(server) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: dynft\r\nContent-Type: application/json\r\n"
            b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'14\r\n{"texts": ["hello"]}\r\n0\r\n\r\n'
        )
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert b'"code":"invalid_request"' in answer and b"Transfer-Encoding" in answer


class Transport(asyncio.Transport):
    """A stand-in for a socket: what the protocol writes is kept. Request tasks still unwinding
    and connections past twice the limit cannot be produced on demand over real sockets, so the
    test below drives uvicorn's own protocol code with this instead."""

    def __init__(self) -> None:
        super().__init__()
        self.out, self.closed = b"", False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += bytes(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1), "sockname": ("127.0.0.1", 2)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def test_admission_counts_connections_once_and_closes_those_past_twice_the_limit() -> None:
    """``limit`` connections are served, tasks or not (a keep-alive connection's next request
    can arrive while the task of its previous one is still unwinding: uvicorn counted those and
    refused 150 clients of a limit of 256); the next ``limit`` get a 503 to their first head;
    beyond those a connection is closed at once; a connection that leaves makes room."""
    import uvicorn
    from uvicorn.server import ServerState

    async def ok(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def answers() -> list[bytes]:
        state = ServerState()
        config = uvicorn.Config(app=ok, log_level="error")
        config.load()
        protocol = make_head_deadline(1.0, 2)
        state.tasks.update(object() for _ in range(100))  # type: ignore[misc]
        connections = []
        for _ in range(5):
            connection, transport = protocol(config=config, server_state=state, app_state={}), Transport()
            connection.connection_made(transport)
            connections.append((connection, transport))
        for connection, transport in connections:
            if not transport.closed:
                connection.data_received(HEAD)
        await asyncio.sleep(0.05)  # the requests' tasks run
        out = [
            transport.out.split(b"\r\n")[0] + (b" closed" if transport.closed else b"") for _, transport in connections
        ]
        connections[0][0].connection_lost(None)  # a served one leaves: room for one more
        for refused, _ in connections[2:]:
            refused.connection_lost(None)
        connection, transport = protocol(config=config, server_state=state, app_state={}), Transport()
        connection.connection_made(transport)
        connection.data_received(HEAD)
        await asyncio.sleep(0.05)
        return [*out, transport.out.split(b"\r\n")[0]]

    assert asyncio.run(answers()) == [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 503 Service Unavailable closed",
        b"HTTP/1.1 503 Service Unavailable closed",
        b" closed",
        b"HTTP/1.1 200 OK",
    ]


def test_registry_503_bodies_carry_no_paths_or_os_errors(
    tiny_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from test_state_faults import mounted

    caplog.set_level(logging.ERROR)
    registry = AdapterRegistry(tiny_settings.registry_dir)
    registry.publish(AdapterState({"w": torch.ones(2)}, ["a"], {"peft_type": "LORA"}), {"step": 1})
    with running_server(tiny_settings) as (base, _), httpx.Client(base_url=base, timeout=30) as client:
        registry.pointer_path.write_text("{ not json")  # a corrupt pointer: the registry cannot be read
        r = client.get("/v1/adapters")
        assert r.status_code == 503 and r.headers["retry-after"] == "10"
        unreadable = {
            "error": {"code": "registry_unreadable", "message": "the registry cannot be read now; see the server log"}
        }
        assert r.json() == unreadable
        # Found by a probe: with a damaged pointer, unpin answered 500 and rollback/promote 409
        # with the file's path in the body; which version serves is unknown, so each is a 503.
        auth = {"Authorization": f"Bearer {TOKEN}"}
        for damage in (b"{ not json", b"\xff\xfe[1]"):
            registry.pointer_path.write_bytes(damage)
            for route in ("/v1/adapters/1/promote", "/v1/adapters/rollback", "/v1/adapters/unpin"):
                r = client.post(route, headers=auth)
                assert (r.status_code, r.json()) == (503, unreadable), route
            assert client.get("/v1/adapters").json() == unreadable
        registry.pointer_path.unlink()
        with mounted(tiny_settings.registry_dir, "--bind", str(tiny_settings.registry_dir)):
            remount = subprocess.run(
                ["mount", "-o", "remount,ro,bind", str(tiny_settings.registry_dir)], capture_output=True, text=True
            )
            if remount.returncode != 0:
                pytest.skip(f"read-only remount refused ({remount.stderr.strip()})")
            r = client.post("/v1/adapters/1/promote", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 503 and r.headers["retry-after"] == "10"
        assert r.json() == {
            "error": {
                "code": "registry_unwritable",
                "message": "the registry cannot be written now; see the server log",
            }
        }
        # Promote: a version that does not exist is 404, one that exists but cannot load is 409,
        # told apart by the error's type (VersionNotFoundError), not by its message.
        assert client.post("/v1/adapters/7/promote", headers=auth).status_code == 404
        (registry.path(1) / "labels.json").write_text('["tampered"]')
        r = client.post("/v1/adapters/1/promote", headers=auth)
        assert r.status_code == 409 and "content hash mismatch" in r.json()["error"]["message"]
    logged = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert any("serving.json" in m and str(tiny_settings.registry_dir) in m for m in logged), logged
    assert any("Read-only file system" in m for m in logged), logged
