"""The start-up probe of a Kafka address, against real sockets that are not Kafka brokers."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from dynft.errors import KafkaRefusedError, exit_code
from dynft.sources.kafka_connect import probe


@pytest.fixture
def not_kafka() -> Iterator[str]:
    """A listener that answers every request with a frame of another protocol: a length, then bytes
    whose first four are no correlation id the client sent (as a wrong service on the port does)."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(b"\x00\x00\x00\x08garbage!")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(5)
    server.close()


def test_an_address_that_answers_in_another_protocol_is_refused_not_a_traceback(not_kafka: str) -> None:
    """Found by a probe: kafka-python's CorrelationIdError went out of `dynft produce` as a
    traceback, and `dynft run` restarted its trainer for ever. A wrong port is a configuration
    error (exit 2): restarting cannot help."""
    with pytest.raises(KafkaRefusedError, match="answers, but not as a Kafka broker") as err:
        probe([not_kafka], {}, timeout_s=5)
    assert exit_code(err.value) == 2
