"""Connecting to Kafka: the source URI, the client options, the security warnings, telling down from
refused, and the commit a consumer makes before it joins.

``client_config`` turns the ``[kafka]`` settings into kafka-python's security options, shared
by the consumer, the dead-letter producer, the admin client and ``dynft produce``.
``security_warnings`` names what is weaker than it looks (credentials that are not used, a
PLAIN password sent in the clear).

``probe`` takes one blocking look at the brokers before any kafka-python client is built.

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

import logging
import re
import socket
import ssl
import struct
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from dynft.errors import BrokersUnavailableError, ConfigError, KafkaRefusedError, SourceError
from dynft.settings import KafkaSettings

if TYPE_CHECKING:
    from kafka import TopicPartition

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 10.0


def quiet_kafka_logs(level: int) -> None:
    """kafka-python logs every refused connection and metadata retry (over a hundred lines in a
    30 s outage, with tracebacks); dynft reports outages, refusals and recoveries itself, once
    each. Its own logs show only at DEBUG."""
    logging.getLogger("kafka").setLevel(logging.DEBUG if level <= logging.DEBUG else logging.CRITICAL)


_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")  # Kafka's own rule for topic names
MAX_GROUP_CHARS = 255  # Kafka's limit is its protocol's 32,767-byte string; past it the client loops on errors


def servers_problem(servers: list[str]) -> str | None:
    """Why ``servers`` are no bootstrap servers (each ``HOST:PORT``, a port of 1-65535), or None.

    >>> servers_problem(["b1:9092", "[::1]:9092"]), servers_problem(["garbage"]), servers_problem(["h:99999"])
    (None, "'garbage' is not HOST:PORT", "'h:99999' is not HOST:PORT (a port of 1-65535)")
    """
    if not servers:
        return "no HOST:PORT given"
    for server in servers:
        host, _, port = server.rpartition(":")
        if not host or not port.isdigit():
            return f"{server[:64]!r} is not HOST:PORT"
        if not 0 < int(port) < 65536:
            return f"{server[:64]!r} is not HOST:PORT (a port of 1-65535)"
    return None


def parse_kafka_uri(uri: str, default_group: str) -> tuple[list[str], list[str], str]:
    """``kafka://h1:9092,h2:9092/t1,t2?group=g`` -> (bootstrap servers, topics, group)."""
    parts = urlsplit(uri)
    servers = [s for s in parts.netloc.split(",") if s]
    topics = [t for t in parts.path.lstrip("/").split(",") if t]
    if parts.scheme != "kafka" or not servers or not topics:
        raise SourceError(f"bad Kafka source {uri!r}: expected kafka://HOST:PORT/TOPIC[,TOPIC]?group=GROUP")
    problem = servers_problem(servers)
    if problem is not None:
        raise SourceError(f"bad Kafka source {uri!r}: {problem}")
    bad = next((t for t in topics if not _TOPIC.fullmatch(t) or t in (".", "..")), None)
    if bad is not None:  # the broker would refuse it only once the consumer runs: a restart loop
        raise SourceError(
            f"bad Kafka source {uri!r}: topic {bad[:64]!r} is not a Kafka topic name ([A-Za-z0-9._-]{{1,249}})"
        )
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - {"group"}
    if unknown:
        raise SourceError(f"bad Kafka source {uri!r}: unknown parameter(s) {sorted(unknown)}; only group")
    groups = query.get("group", [default_group])
    if len(groups) != 1 or not groups[0].strip() or len(groups[0]) > MAX_GROUP_CHARS:
        raise SourceError(f"bad Kafka source {uri!r}: give one group of 1-{MAX_GROUP_CHARS} characters")
    return servers, topics, groups[0]


def stream_of(tp: TopicPartition) -> str:
    return f"{tp.topic}/{tp.partition}"


def partition_of(stream: str) -> TopicPartition:
    from kafka import TopicPartition

    topic, _, partition = stream.rpartition("/")
    return TopicPartition(topic, int(partition))


def client_config(settings: KafkaSettings) -> dict[str, Any]:
    """Security and identity options shared by consumer, producer and admin client."""
    config: dict[str, Any] = {
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol,
        "ssl_check_hostname": settings.ssl_check_hostname,
    }
    if settings.sasl_mechanism:
        config["sasl_mechanism"] = settings.sasl_mechanism
        config["sasl_plain_username"] = settings.sasl_username
        if settings.sasl_password is not None:
            config["sasl_plain_password"] = settings.sasl_password.get_secret_value()
    for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        value = getattr(settings, key)
        if value is not None:
            config[key] = str(value)
    if settings.ssl_password is not None:
        config["ssl_password"] = settings.ssl_password.get_secret_value()
    return config


def commit_checkpoint_ahead(consumer: Any, resume: dict[str, int]) -> None:
    """Before joining: commit checkpointed positions the group lacks (a crash came between the two)."""
    from kafka import OffsetAndMetadata
    from kafka.errors import KafkaError

    ahead = {}
    for stream, offset in resume.items():
        tp = partition_of(stream)
        try:
            committed = consumer.committed(tp)
        except KafkaError as exc:
            log.warning("cannot read the committed offset of %s: %s", stream, exc)
            continue
        if committed is None or committed < offset:
            ahead[tp] = OffsetAndMetadata(offset, "", -1)
    if not ahead:
        return
    try:
        consumer.commit(ahead)
        log.info("committed %d checkpointed position(s) the group was missing", len(ahead))
    except KafkaError as exc:  # the group is active elsewhere: its members own those partitions now
        log.warning("could not commit checkpointed positions before joining: %s", exc)


def security_warnings(settings: KafkaSettings) -> list[str]:
    """What in the security settings is weaker than it looks; logged once at startup."""
    sasl = settings.security_protocol.startswith("SASL_")
    warnings = []
    if not sasl and (settings.sasl_mechanism or settings.sasl_username or settings.sasl_password):
        warnings.append(
            f"kafka SASL settings are ignored with security_protocol {settings.security_protocol}: "
            "the brokers are reached without authentication (use SASL_SSL)"
        )
    if settings.security_protocol == "SASL_PLAINTEXT" and settings.sasl_mechanism == "PLAIN":
        warnings.append("kafka SASL PLAIN over SASL_PLAINTEXT sends the password in the clear (use SASL_SSL)")
    return warnings


def is_refusal(exc: Exception) -> bool:
    """Whether a kafka-python error is a broker refusing this client (not an outage)."""
    import kafka.errors as errors

    refusals = (
        errors.AuthorizationError,
        errors.SaslAuthenticationFailedError,
        errors.UnsupportedSaslMechanismError,
        errors.IllegalSaslStateError,
        errors.KafkaConfigurationError,  # not the brokers: this client's options; just as final
    )
    return isinstance(exc, refusals)


def refused(what: str, exc: Exception) -> ConfigError:
    """The configuration error for an error ``is_refusal`` accepts."""
    import kafka.errors as errors

    if isinstance(exc, errors.KafkaConfigurationError):
        return ConfigError(f"{what}: invalid Kafka client options ({exc})")
    return KafkaRefusedError(f"{what}: the brokers refuse this client ({type(exc).__name__}: {exc})")


def probe(servers: list[str], config: dict[str, Any], timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Return once one of ``servers`` accepts the connection and the credentials in ``config``.

    ``config`` holds kafka-python's client options (``client_config``). Raises
    ``BrokersUnavailableError`` when none answers, ``KafkaRefusedError`` when one refuses or
    answers in another protocol than Kafka's (a wrong port: restarting cannot help).
    """
    from kafka.errors import KafkaError

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
        except (KafkaError, ValueError, struct.error) as exc:  # found by a probe: a traceback, and a restart loop
            raise KafkaRefusedError(f"{server}: answers, but not as a Kafka broker ({exc!r:.200})") from exc
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
    with conn:  # the TLS socket owns the descriptor now: closing ``sock`` would not release it
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
            raise KafkaRefusedError(
                f"{host}: SASL {mechanism_name} authentication refused ({error}: {answer.error_message})"
            )
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
