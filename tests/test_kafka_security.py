"""Kafka security proven against the real broker (issue #12, item 11).

One broker of this module's own, with a SASL_SSL listener (PLAIN and SCRAM-SHA-512; TLS with a
required client certificate) and a SASL_PLAINTEXT listener (SCRAM-SHA-512). Its certificates
are made here with openssl: a CA, the broker's certificate for 127.0.0.1 (only), and a
client certificate whose key is encrypted with a password.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from kafka import KafkaConsumer
from prometheus_client import CollectorRegistry

from dynft import devbroker
from dynft.cli import main
from dynft.devbroker import Broker, SecureListeners
from dynft.errors import ConfigError, KafkaRefusedError
from dynft.loop import TrainingLoop
from dynft.settings import KafkaSettings, Settings, load_settings
from dynft.sources.kafka_connect import client_config, probe, security_warnings

from helpers import keyword_events, write_jsonl
from kafka_helpers import end_offsets, ledger_of, wait_until

USER, PASSWORD, KEY_PASSWORD = "alice", "alice-secret", "client-key-pw"
LABELS = ["alpha", "beta", "gamma"]


@dataclass(frozen=True)
class Tls:
    ca: Path
    cert: Path
    key: Path  # encrypted with KEY_PASSWORD
    broker_store: Path  # PKCS12, password "storepw"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(d: Path) -> Tls:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-subj", "/CN=dynft-test-ca", "-days", "2", cwd=d)  # fmt: skip
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key", "-out", "broker.csr",
            "-subj", "/CN=dynft-test-broker", cwd=d)  # fmt: skip
    openssl("x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "broker.pem", "-days", "2", "-extfile", "san.cnf", cwd=d)  # fmt: skip
    openssl("pkcs12", "-export", "-in", "broker.pem", "-inkey", "broker.key", "-out", "broker.p12",
            "-passout", "pass:storepw", "-name", "broker", cwd=d)  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-passout", f"pass:{KEY_PASSWORD}", "-keyout", "client.key",
            "-out", "client.csr", "-subj", "/CN=dynft-client", cwd=d)  # fmt: skip
    openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "client.pem", "-days", "2", cwd=d)  # fmt: skip
    return Tls(d / "ca.pem", d / "client.pem", d / "client.key", d / "broker.p12")


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def secure_broker(tls: Tls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """Started only by this module's broker tests; PLAINTEXT stays for the controller and the checks."""
    security = SecureListeners(tls.broker_store, "storepw", tls.ca, {USER: PASSWORD})
    broker = devbroker.start(tmp_path_factory.mktemp("secure-kafka"), security=security)
    try:
        yield broker
    finally:
        devbroker.stop(broker.data_dir)


def secured(broker: Broker, tls: Tls, listener: str, password: str = PASSWORD) -> tuple[str, list[str]]:
    """(bootstrap, --set options) for one way in: sasl_ssl_plain, sasl_ssl_scram or scram."""
    options = [f"kafka.sasl_username={USER}", f"kafka.sasl_password={password}"]
    if listener == "scram":
        options += ["kafka.security_protocol=SASL_PLAINTEXT", "kafka.sasl_mechanism=SCRAM-SHA-512"]
        return f"127.0.0.1:{broker.scram_port}", options
    mechanism = "PLAIN" if listener == "sasl_ssl_plain" else "SCRAM-SHA-512"
    options += ["kafka.security_protocol=SASL_SSL", f"kafka.sasl_mechanism={mechanism}"]
    options += [f"kafka.ssl_cafile={tls.ca}", f"kafka.ssl_certfile={tls.cert}", f"kafka.ssl_keyfile={tls.key}"]
    options += [f"kafka.ssl_password={KEY_PASSWORD}", "kafka.ssl_check_hostname=true"]
    return f"127.0.0.1:{broker.sasl_ssl_port}", options


def overrides(options: list[str]) -> dict[str, str]:
    return dict(option.split("=", 1) for option in options)


def dynft_produce(bootstrap: str, topic: str, path: Path, options: list[str]) -> tuple[int, str]:
    args = ["produce", str(path), "--topic", topic, "--bootstrap", bootstrap]
    for option in options:
        args += ["--set", option]
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


@pytest.mark.slow
@pytest.mark.parametrize("listener", ["sasl_ssl_plain", "scram"])
def test_events_are_consumed_and_dead_letters_delivered_over_a_secured_listener(
    listener: str, secure_broker: Broker, tls: Tls, tiny_settings: Settings, tmp_path: Path
) -> None:
    """`dynft produce`, the consumer and the dead-letter producer all go through the secured
    listener (SASL_SSL with PLAIN, a client certificate with an encrypted key and the hostname
    check; or SASL_PLAINTEXT with SCRAM-SHA-512): every event is trained or held out, the
    offsets are committed, and the malformed records are in the dead-letter topic."""
    bootstrap, options = secured(secure_broker, tls, listener)
    topic, group = f"secure-{uuid.uuid4().hex[:8]}", f"g-{listener}"
    events = keyword_events(200, LABELS, seed=81)
    path = write_jsonl(tmp_path / "events.jsonl", [*events[:100], b"{not json", *events[100:], b"[1, 2]"])
    code, output = dynft_produce(bootstrap, topic, path, options)
    assert code == 0, output
    settings = tiny_settings.model_copy(deep=True)
    for key, value in overrides(options).items():
        setattr(settings.kafka, key.removeprefix("kafka."), value)  # validated and converted on assignment
    settings.source.uri = f"kafka://{bootstrap}/{topic}?group={group}"
    settings.checkpoint.interval_s = 1.0
    loop = TrainingLoop(settings, CollectorRegistry())
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:

        def drained() -> bool:
            ends, committed = end_offsets(secure_broker, topic, group)
            return committed == ends

        wait_until(drained, 180, "the committed offsets to reach the log end")
    finally:
        loop.should_exit.set()
        thread.join(120)
    statuses = ledger_of(settings.state_dir).lookup(e["id"] for e in events)
    assert {s for s, _ in statuses.values()} <= {"trained", "held_out"}
    consumer = KafkaConsumer(
        f"{topic}.dlq",
        bootstrap_servers=secure_broker.bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
    )
    try:
        letters = sorted(m.value for m in consumer)
    finally:
        consumer.close()
    assert letters == [b"[1, 2]", b"{not json"]


@pytest.mark.slow
def test_wrong_credentials_stop_dynft_train_with_exit_2_and_a_message(
    secure_broker: Broker, tls: Tls, tiny_settings: Settings, tmp_path: Path
) -> None:
    """A broker that answers and refuses is a configuration error at startup: exit 2 with the
    reason, once (`dynft run` does not restart a child that exits 2), not a wait or a crash loop."""
    bootstrap, options = secured(secure_broker, tls, "scram", password="wrong")
    cmd = [sys.executable, "-m", "dynft", "train", "--model", str(tiny_settings.model.path)]
    cmd += ["--state-dir", str(tmp_path / "state"), "--source", f"kafka://{bootstrap}/anything?group=g"]
    for option in options:
        cmd += ["--set", option]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "SASL SCRAM-SHA-512 authentication refused" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("listener", ["sasl_ssl_plain", "sasl_ssl_scram", "scram"])
def test_wrong_password_is_refused_and_the_right_one_accepted_by_probe(
    listener: str, secure_broker: Broker, tls: Tls
) -> None:
    bootstrap, options = secured(secure_broker, tls, listener)
    settings = load_settings(overrides=overrides(options))
    probe([bootstrap], client_config(settings.kafka))  # accepted: returns
    _, wrong = secured(secure_broker, tls, listener, password="wrong")
    with pytest.raises(KafkaRefusedError, match="authentication refused"):
        probe([bootstrap], client_config(load_settings(overrides=overrides(wrong)).kafka))


@pytest.mark.slow
def test_tls_without_the_client_certificate_or_with_a_wrong_key_password_is_refused(
    secure_broker: Broker, tls: Tls, tmp_path: Path
) -> None:
    bootstrap, options = secured(secure_broker, tls, "sasl_ssl_plain")
    no_cert = [o for o in options if not o.startswith(("kafka.ssl_certfile", "kafka.ssl_keyfile", "kafka.ssl_pass"))]
    with pytest.raises(KafkaRefusedError, match="TLS handshake was refused"):
        probe([bootstrap], client_config(load_settings(overrides=overrides(no_cert)).kafka))
    bad_key = [*options, "kafka.ssl_password=not-it"]
    with pytest.raises(KafkaRefusedError, match="TLS files cannot be loaded"):
        probe([bootstrap], client_config(load_settings(overrides=overrides(bad_key)).kafka))
    code, output = dynft_produce(bootstrap, "t", write_jsonl(tmp_path / "e.jsonl", [{"id": 1}]), bad_key)
    assert code == 2 and "TLS files cannot be loaded" in output


@pytest.mark.slow
def test_the_hostname_check_refuses_a_certificate_for_another_name(secure_broker: Broker, tls: Tls) -> None:
    """The broker's certificate names 127.0.0.1 only; reached as localhost (the same broker,
    a CA-signed certificate) it does not match, and only the hostname check tells."""
    _, options = secured(secure_broker, tls, "sasl_ssl_plain")
    other = f"localhost:{secure_broker.sasl_ssl_port}"
    checked = load_settings(overrides=overrides(options)).kafka
    with pytest.raises(KafkaRefusedError, match="TLS handshake was refused"):
        probe([other], client_config(checked))
    unchecked = load_settings(overrides={**overrides(options), "kafka.ssl_check_hostname": "false"}).kafka
    probe([other], client_config(unchecked))


def test_oauthbearer_is_refused_at_startup_with_a_clear_message() -> None:
    with pytest.raises(ConfigError, match="OAUTHBEARER needs a token provider"):
        load_settings(overrides={"kafka.security_protocol": "SASL_SSL", "kafka.sasl_mechanism": "OAUTHBEARER"})


def test_weak_security_settings_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    plain_in_clear = KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="u")
    unused = KafkaSettings(security_protocol="PLAINTEXT", sasl_mechanism="SCRAM-SHA-512", sasl_username="u")
    assert [w.split(" ")[2] for w in security_warnings(plain_in_clear)] == ["PLAIN"]
    assert "ignored with security_protocol PLAINTEXT" in security_warnings(unused)[0]
    assert security_warnings(KafkaSettings(security_protocol="SASL_SSL", sasl_mechanism="PLAIN")) == []
    assert security_warnings(KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512")) == []
    from dynft.metrics import KafkaMetrics
    from dynft.sources.kafka import KafkaSource

    with caplog.at_level(logging.WARNING, logger="dynft.sources.kafka"):
        KafkaSource("kafka://127.0.0.1:1/t", plain_in_clear, KafkaMetrics(CollectorRegistry()))
    assert "sends the password in the clear" in caplog.text


def test_the_key_password_is_a_secret_masked_like_the_others() -> None:
    settings = load_settings(overrides={"kafka.ssl_password": "hunter2", "kafka.sasl_password": "pw"})
    assert settings.public_dump()["kafka"]["ssl_password"] == "**********"
    assert "hunter2" not in str(settings.public_dump())
    config = client_config(settings.kafka)
    assert config["ssl_password"] == "hunter2" and config["ssl_check_hostname"] is True
