"""One blocking look at the brokers before any kafka-python client is built: down, or refusing?

kafka-python 3.0 reports a broker that refuses the credentials or the client certificate the
same way as one that is down: its bootstrap retries until it times out ("Unable to bootstrap")
because the broker closes the connection right after its error response. The two need
opposite handling (wait for brokers that are down; stop with a configuration error on a
refusal), so ``probe`` connects to one bootstrap server itself, runs the TLS handshake and the
SASL exchange with kafka-python's own protocol and mechanism classes, and reads the error
code the broker sends back.

- ``BrokersUnavailableError``: nothing answered (refused or reset TCP connection, timeout).
- ``KafkaRefusedError``: a broker answered and refused (SASL authentication failed, the
  mechanism is not enabled, the TLS handshake or client certificate was rejected), or the
  client's own TLS material cannot be loaded.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

from dynft.errors import BrokersUnavailableError, KafkaRefusedError

PROBE_TIMEOUT_S = 10.0


def probe(servers: list[str], config: dict[str, Any], timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Return once one of ``servers`` accepts the connection and the credentials in ``config``.

    ``config`` holds kafka-python's client options (``client_config``). Raises
    ``BrokersUnavailableError`` when none answers, ``KafkaRefusedError`` when one refuses.
    """
    context = _ssl_context(config)
    unavailable: list[str] = []
    for server in servers:
        host, _, port = server.rpartition(":")
        try:
            sock = socket.create_connection((host, int(port)), timeout=timeout_s)
        except OSError as exc:
            unavailable.append(f"{server}: {exc}")
            continue
        try:
            _authenticate(sock, host, context, config)
            return
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, TimeoutError, ConnectionError) as exc:
            unavailable.append(f"{server}: {exc!r}")  # closed mid-handshake: a broker going down or up
        except ssl.SSLError as exc:
            raise KafkaRefusedError(f"{server}: the TLS handshake was refused ({exc})") from exc
        finally:
            sock.close()
    raise BrokersUnavailableError(f"no Kafka broker answers ({'; '.join(unavailable)})")


def _ssl_context(config: dict[str, Any]) -> ssl.SSLContext | None:
    """The client's TLS context, as kafka-python builds it; a file it cannot load is refused here."""
    if config.get("security_protocol") not in ("SSL", "SASL_SSL"):
        return None
    try:
        context = ssl.create_default_context(cafile=config.get("ssl_cafile"))
        context.check_hostname = bool(config.get("ssl_check_hostname", True))
        if config.get("ssl_certfile"):
            context.load_cert_chain(config["ssl_certfile"], config.get("ssl_keyfile"), config.get("ssl_password"))
    except (ssl.SSLError, OSError) as exc:
        raise KafkaRefusedError(f"the TLS files cannot be loaded ({exc}); check kafka.ssl_* settings") from exc
    return context


def _authenticate(sock: socket.socket, host: str, context: ssl.SSLContext | None, config: dict[str, Any]) -> None:
    """TLS handshake, then the SASL exchange when the protocol has one; then one round trip."""
    from kafka.protocol.metadata import ApiVersionsRequest
    from kafka.protocol.parser import KafkaProtocol

    conn: socket.socket = context.wrap_socket(sock, server_hostname=host) if context else sock
    protocol = KafkaProtocol(client_id=config.get("client_id", "dynft"))
    if config.get("security_protocol", "").startswith("SASL_"):
        _sasl(conn, protocol, host, config)
    request = ApiVersionsRequest(version=0)  # proves the connection is usable (TLS 1.3 checks the cert late)
    _round_trip(conn, protocol, request)


def _sasl(conn: socket.socket, protocol: Any, host: str, config: dict[str, Any]) -> None:
    import kafka.errors as errors
    from kafka.net.sasl import get_sasl_mechanism
    from kafka.protocol.sasl import SaslAuthenticateRequest, SaslHandshakeRequest

    mechanism_name = config.get("sasl_mechanism")
    response = _round_trip(conn, protocol, SaslHandshakeRequest(mechanism=mechanism_name, version=1))
    if response.error_code or mechanism_name not in response.mechanisms:
        raise KafkaRefusedError(
            f"{host}: SASL mechanism {mechanism_name} is not enabled on this listener (it offers {response.mechanisms})"
        )
    mechanism = get_sasl_mechanism(mechanism_name)(host=host, **config)
    while not mechanism.is_done():
        answer = _round_trip(conn, protocol, SaslAuthenticateRequest(auth_bytes=mechanism.auth_bytes(), version=1))
        if answer.error_code:
            error = errors.for_code(answer.error_code).__name__
            raise KafkaRefusedError(f"{host}: SASL {mechanism_name} authentication refused ({error}: {answer.error_message})")
        mechanism.receive(answer.auth_bytes)
    if not mechanism.is_authenticated():
        raise KafkaRefusedError(f"{host}: SASL {mechanism_name} authentication failed")


def _round_trip(conn: socket.socket, protocol: Any, request: Any) -> Any:
    protocol.send_request(request)
    conn.sendall(protocol.send_bytes())
    while True:
        data = conn.recv(65536)
        if not data:
            raise ConnectionResetError("the broker closed the connection")
        responses = protocol.receive_bytes(data)
        if responses:
            return responses[0][1]
