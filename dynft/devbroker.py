"""A single-node Apache Kafka broker (KRaft) for development, tests and CI.

The jars come from Maven Central through ``deploy/kafka/pom.xml`` into ``deploy/kafka/libs``
(git-ignored, fetched once). The broker runs as a plain ``java -cp 'libs/*' kafka.Kafka``
with broker and controller in one process, on loopback, with a small heap and replication
factor 1. Its data directory holds the config, the logs, ``broker.log`` and ``broker.json``
(pid and ports), so ``stop`` needs nothing but the directory.

With ``SecureListeners`` the broker also listens with SASL_SSL (PLAIN and SCRAM-SHA-512, TLS
with a required client certificate) and SASL_PLAINTEXT (SCRAM-SHA-512), for the security
tests; the controller and the readiness probe keep using the PLAINTEXT listener.
"""

from __future__ import annotations

import base64
import gc
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

from dynft.errors import DynftError

KAFKA_DIR = Path(__file__).resolve().parents[1] / "deploy" / "kafka"
LOG4J = """status = error
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = FILE
"""


# Brokers started by this process, kept so that stop() can reap them (and Python does not
# warn about a Popen object collected while its process still runs).
_started: dict[int, subprocess.Popen[bytes]] = {}


class BrokerError(DynftError):
    """The development broker cannot be provisioned, started or stopped."""


class BrokerExited(BrokerError):
    """The broker process exited before it answered."""


@dataclass(frozen=True)
class SecureListeners:
    """TLS material and SASL users for the broker's secured listeners.

    ``keystore`` is a PKCS12 file with the broker's key and certificate (valid for 127.0.0.1);
    ``truststore`` a PEM file of the CA certificates that client certificates must chain to.
    Each user in ``users`` may log in with PLAIN (SASL_SSL only) or SCRAM-SHA-512 (both).
    """

    keystore: Path
    keystore_password: str
    truststore: Path
    users: dict[str, str]


@dataclass(frozen=True)
class Broker:
    port: int
    controller_port: int
    data_dir: Path
    pid: int
    sasl_ssl_port: int | None = None  # with SecureListeners: SASL_SSL, PLAIN and SCRAM-SHA-512
    scram_port: int | None = None  # with SecureListeners: SASL_PLAINTEXT, SCRAM-SHA-512

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


def free_port() -> int:
    """A free loopback port in 10000-29999, below the kernel's ephemeral range.

    A port from the ephemeral range (what binding port 0 gives) can be taken by any client
    connection's source port between being chosen here and the broker's bind, and the broker
    then exits; below that range only another explicit bind can take it. (The test suite also
    knows a broker's sockets by this range: see ``filterwarnings`` in ``pyproject.toml``.)
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, max(min(low, 30000), 10001))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # the low range is crowded: let the kernel choose
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_jars(libs: Path | None = None) -> Path:
    """The directory of broker jars, fetched with Maven on first use."""
    libs = libs or KAFKA_DIR / "libs"
    if any(libs.glob("kafka_2.13-*.jar")):
        return libs
    pom = KAFKA_DIR / "pom.xml"
    if not pom.is_file():
        raise BrokerError(f"no broker jars in {libs} and no {pom} to fetch them with (pass --libs DIR)")
    if shutil.which("mvn") is None:
        raise BrokerError("Maven (mvn) is needed once to fetch the Kafka broker jars; install it or pass --libs DIR")
    result = subprocess.run(
        ["mvn", "-q", "-B", "-f", str(pom), "package", f"-Dlibs.dir={libs}"], capture_output=True, text=True
    )
    if result.returncode != 0 or not any(libs.glob("kafka_2.13-*.jar")):
        raise BrokerError(f"fetching the Kafka jars failed:\n{(result.stdout + result.stderr)[-2000:]}")
    return libs


def _properties(port: int, controller: int, logs: Path, secure: dict[str, int] | None = None) -> str:
    extra = "".join(f",{name}://127.0.0.1:{p}" for name, p in (secure or {}).items())
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.bootstrap.servers=127.0.0.1:{controller}",
            f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}{extra}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}{extra}",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL,SCRAM:SASL_PLAINTEXT",
            "inter.broker.listener.name=PLAINTEXT",
            f"log.dirs={logs}",
            "num.partitions=1",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=3",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=true",
            "",
        ]
    )


def _secure_properties(security: SecureListeners) -> str:
    """The SASL and TLS settings of the SASL_SSL and SCRAM listeners."""
    scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    plain_users = " ".join(f'user_{name}="{password}"' for name, password in security.users.items())
    tls = "listener.name.sasl_ssl.ssl"
    return "\n".join(
        [
            "listener.name.sasl_ssl.sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-512",
            f"listener.name.sasl_ssl.plain.sasl.jaas.config="
            f"org.apache.kafka.common.security.plain.PlainLoginModule required {plain_users};",
            f"listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config={scram}",
            "listener.name.scram.sasl.enabled.mechanisms=SCRAM-SHA-512",
            f"listener.name.scram.scram-sha-512.sasl.jaas.config={scram}",
            f"{tls}.keystore.type=PKCS12",
            f"{tls}.keystore.location={security.keystore}",
            f"{tls}.keystore.password={security.keystore_password}",
            f"{tls}.key.password={security.keystore_password}",
            f"{tls}.truststore.type=PEM",
            f"{tls}.truststore.location={security.truststore}",
            f"{tls}.client.auth=required",
            "",
        ]
    )


def _java(libs: Path, data_dir: Path, *args: str) -> list[str]:
    return [
        "java",
        "-Xmx512m",
        "-Xms128m",
        "-XX:+UseSerialGC",
        "-cp",
        f"{libs}/*",
        f"-Dlog4j2.configurationFile={data_dir / 'log4j2.properties'}",
        *args,
    ]


def running(data_dir: Path) -> Broker | None:
    """The broker started from ``data_dir``, if its process is alive."""
    try:
        info = json.loads((data_dir / "broker.json").read_text())
        os.kill(info["pid"], 0)
    except (OSError, ValueError, KeyError):
        return None
    return Broker(
        info["port"], info["controller_port"], data_dir, info["pid"], info.get("sasl_ssl_port"), info.get("scram_port")
    )


def start(
    data_dir: Path,
    port: int = 0,
    libs: Path | None = None,
    timeout_s: float = 90.0,
    controller_port: int = 0,
    security: SecureListeners | None = None,
) -> Broker:
    """Start a broker (formatting ``data_dir`` on first use) and wait until it answers.

    To restart a stopped broker on its old data, pass its old ports: the KRaft quorum recorded
    its controller's address when the directory was formatted. ``security`` adds the SASL_SSL
    and SCRAM listeners (on free ports) and creates its SCRAM users at format time. A new
    broker on ports chosen here that exits before answering is tried again on other ports (a
    port can still be taken between being chosen and bound); the error quotes its output.
    """
    current = running(data_dir)
    if current is not None:
        return current
    libs = ensure_jars(libs)
    if shutil.which("java") is None:
        raise BrokerError("java is needed to run the Kafka broker")
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    fresh = not (data_dir / "logs" / "meta.properties").exists() and not port and not controller_port
    attempts = 3 if fresh else 1  # ports given (a restart on old data): the same ports or none
    for attempt in range(attempts):
        if attempt:
            shutil.rmtree(data_dir / "logs", ignore_errors=True)
        broker, process = _launch(data_dir, libs, port, controller_port, security)
        try:
            wait_ready(broker, timeout_s, process)
            return broker
        except BrokerExited:
            _started.pop(process.pid, None)
            if attempt == attempts - 1:
                raise
        except BrokerError:
            stop(data_dir)
            raise
    raise AssertionError("unreachable: the last attempt returns or raises")


def _launch(
    data_dir: Path, libs: Path, port: int, controller_port: int, security: SecureListeners | None
) -> tuple[Broker, subprocess.Popen[bytes]]:
    """Write the config, format the storage on first use and start the broker process."""
    port, controller = port or free_port(), controller_port or free_port()
    logs = data_dir / "logs"
    secure = {"SASL_SSL": free_port(), "SCRAM": free_port()} if security else None
    properties = _properties(port, controller, logs, secure) + (_secure_properties(security) if security else "")
    (data_dir / "server.properties").write_text(properties)
    (data_dir / "log4j2.properties").write_text(LOG4J.format(log=data_dir / "broker.log"))
    if not (logs / "meta.properties").exists():
        _format(data_dir, libs, security)
    with open(data_dir / "broker.out", "ab") as out:
        process = subprocess.Popen(
            _java(libs, data_dir, "kafka.Kafka", str(data_dir / "server.properties")),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _started[process.pid] = process
    ports = {"sasl_ssl_port": secure["SASL_SSL"], "scram_port": secure["SCRAM"]} if secure else {}
    broker = Broker(port, controller, data_dir, process.pid, **ports)
    info = {"pid": process.pid, "port": port, "controller_port": controller, **ports}
    (data_dir / "broker.json").write_text(json.dumps(info))
    return broker, process


def _format(data_dir: Path, libs: Path, security: SecureListeners | None) -> None:
    cluster = "-"
    while cluster.startswith("-"):  # as Kafka's own ids: a leading dash would read as an option
        cluster = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    config = str(data_dir / "server.properties")
    fmt = _java(libs, data_dir, "kafka.tools.StorageTool", "format", "--standalone", "-t", cluster, "-c", config)
    for name, password in (security.users if security else {}).items():
        fmt.extend(["--add-scram", f"SCRAM-SHA-512=[name={name},password={password}]"])
    result = subprocess.run(fmt, capture_output=True, text=True)
    if result.returncode != 0:
        raise BrokerError(f"formatting {data_dir / 'logs'} failed: {(result.stdout + result.stderr)[-1500:]}")


def wait_ready(broker: Broker, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Until the broker serves metadata requests."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            said = _said(broker.data_dir)
            raise BrokerExited(f"the broker exited with code {process.returncode}; it said:\n{said}")
        try:  # a plain connect first: kafka-python leaks sockets on refused connections
            socket.create_connection(("127.0.0.1", broker.port), timeout=1).close()
        except OSError:
            time.sleep(0.3)
            continue
        try:
            admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=3000)
        except KafkaError:
            _collect_abandoned_sockets()
            time.sleep(0.5)
            continue
        try:  # close even when the broker is not ready yet: an abandoned client leaks its socket
            admin.list_topics()
            return
        except KafkaError:
            time.sleep(0.5)
        finally:
            admin.close()
    raise BrokerError(f"the broker on {broker.bootstrap} did not answer within {timeout_s:.0f} s")


def _collect_abandoned_sockets() -> None:
    """A kafka-python client whose constructor failed leaves its sockets open and unreachable:
    collect them now, quietly, rather than have a later caller's collection warn of them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def _said(data_dir: Path, lines: int = 8) -> str:
    """The broker's last words: its console output and its log's messages (not stack frames)."""
    said = []
    for name in ("broker.out", "broker.log"):
        try:
            text = (data_dir / name).read_text(errors="replace")
        except OSError:
            continue
        said += [line for line in text.splitlines() if line.strip() and not line[0].isspace()][-lines:]
    return "\n".join(said)


def stop(data_dir: Path, timeout_s: float = 30.0) -> bool:
    """Stop the broker of ``data_dir``; returns whether one was running."""
    broker = running(data_dir)
    if broker is None:
        return False
    os.kill(broker.pid, signal.SIGTERM)
    process = _started.pop(broker.pid, None)
    if process is not None:
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    else:  # started by another process (`dynft kafka up`): wait for it by pid
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.kill(broker.pid, 0)
            except OSError:
                break
            time.sleep(0.2)
        else:
            os.kill(broker.pid, signal.SIGKILL)
    (data_dir / "broker.json").unlink(missing_ok=True)
    return True
