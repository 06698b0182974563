"""A daemon started before its brokers waits for them instead of exiting (issue #12, item 4); the
development broker's own start when its port is taken."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer

from dynft import devbroker
from dynft.settings import Settings

from helpers import free_port, keyword_events
from kafka_helpers import accounted, all_accounted, end_offsets, publish, reap, wait_until

pytestmark = pytest.mark.slow
LABELS = ["alpha", "beta", "gamma"]


def read_all(broker: devbroker.Broker, topic: str) -> list[Any]:
    consumer = KafkaConsumer(
        topic, bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5000
    )
    try:
        return list(consumer)
    finally:
        consumer.close()


def test_dynft_run_started_30_s_before_its_broker_waits_and_consumes_everything(
    tiny_settings: Settings, tmp_path: Path
) -> None:
    """Before: `dynft run` against a broker that is not up yet exited 2 ("trainer exited with a
    configuration error; stopping"). Now the trainer waits (logged once), and once a broker
    starts on that address it consumes every event, without a restart of the trainer, and the
    dead-letter topic it could not create at startup is created and receives its dead letter."""
    broker_port, topic, group = free_port(), "late-events", "late"
    state, log = tmp_path / "state", tmp_path / "run.log"
    cmd = [sys.executable, "-m", "dynft", "run", "--model", str(tiny_settings.model.path)]
    cmd += ["--state-dir", str(state), "--port", str(free_port())]
    cmd += ["--source", f"kafka://127.0.0.1:{broker_port}/{topic}?group={group}"]
    cmd += ["--set", "checkpoint.interval_s=1", "--set", "trainer.lr=0.01", "--set", "kafka.reconnect_max_s=2"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    broker = None
    try:
        # From the moment the trainer says it waits (loading the model first can take a while).
        wait_until(lambda: "waiting for the brokers" in log.read_text() or proc.poll() is not None, 240, "the wait")
        time.sleep(30)
        assert proc.poll() is None, log.read_text()[-3000:]
        broker = devbroker.start(tmp_path / "kafka", port=broker_port)
        events = keyword_events(300, LABELS, seed=61)
        publish(broker, topic, [*events[:150], b"{not json", *events[150:]], tmp_path)
        ids = [e["id"] for e in events]
        wait_until(all_accounted([state], ids), 120, "every event trained or held out")
        ends, committed = {}, {0: -1}
        deadline = time.monotonic() + 30
        while committed != ends and time.monotonic() < deadline:  # the commit follows the next checkpoint
            ends, committed = end_offsets(broker, topic, group)
            time.sleep(0.5)
        assert committed == ends
        # The dead-letter topic could not be created at startup: it was, once the broker answered.
        assert [m.value for m in read_all(broker, f"{topic}.dlq")] == [b"{not json"]
        assert proc.poll() is None, log.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
    finally:
        reap(proc)
        if broker is not None:
            devbroker.stop(broker.data_dir)
    output = log.read_text()
    assert output.count("waiting for the brokers") == 1, output[-3000:]  # once, not once per try
    assert "configuration error" not in output
    assert "restarting in" not in output, output[-3000:]  # the trainer never died and came back
    assert {status for status, _ in accounted([state], ids).values()} <= {"trained", "held_out"}


def test_a_broker_whose_port_is_taken_fails_with_its_own_words(tmp_path: Path) -> None:
    """The error quotes the broker's output, so a CI log says why it exited, not just where to look."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        taken = holder.getsockname()[1]
        with pytest.raises(devbroker.BrokerExited, match=r"(?s)exited with code .*already in use"):
            devbroker.start(tmp_path / "kafka", port=taken, timeout_s=60)
    assert devbroker.running(tmp_path / "kafka") is None


def test_a_new_broker_whose_chosen_port_was_taken_meanwhile_starts_on_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process can bind a port between our choosing it and the broker binding it. That race
    cannot be provoked on demand, so the first choice is replaced by a port held here (a stand-in
    for the race, not for the broker): the broker exits on it, and the start is tried again."""
    real, first = devbroker.free_port, []
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        taken = holder.getsockname()[1]
        first.append(taken)  # the broker's PLAINTEXT port: the first one chosen
        monkeypatch.setattr(devbroker, "free_port", lambda: first.pop() if first else real())
        broker = devbroker.start(tmp_path / "kafka", timeout_s=60)
    try:
        assert broker.port != taken
        assert "already in use" in (tmp_path / "kafka" / "broker.log").read_text()  # the first try's words
        assert devbroker.running(tmp_path / "kafka") == broker
    finally:
        devbroker.stop(broker.data_dir)


def test_a_replica_started_before_its_broker_waits_for_it_and_stops_cleanly_meanwhile(tmp_path: Path) -> None:
    """Found by a probe: `dynft serve --follow` against a broker not up yet exited 1 after 38 s
    with kafka-python's "Unable to bootstrap", where a trainer waits."""
    broker_port, log = free_port(), tmp_path / "replica.log"

    def replica(state: str) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "dynft", "serve", "--follow", f"kafka://127.0.0.1:{broker_port}/late.versions"]
        cmd += ["--state-dir", str(tmp_path / state), "--port", str(free_port()), "--set", "kafka.reconnect_max_s=1"]
        with open(log, "ab") as out:
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)

    first = replica("a")
    try:
        wait_until(lambda: "waiting for the brokers" in log.read_text() or first.poll() is not None, 120, "the wait")
        time.sleep(5)
        assert first.poll() is None, log.read_text()[-3000:]
        first.send_signal(signal.SIGTERM)  # while it waits: a clean end, not a traceback
        assert first.wait(30) == 0, log.read_text()[-3000:]
    finally:
        reap(first)
    second, broker = replica("b"), None
    try:
        wait_until(lambda: log.read_text().count("waiting for the brokers") == 2, 120, "the second wait")
        broker = devbroker.start(tmp_path / "kafka", port=broker_port)
        wait_until(lambda: "checked the versions topics" in log.read_text(), 120, "the topics read to their end")
        assert second.poll() is None, log.read_text()[-3000:]
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0, log.read_text()[-3000:]
    finally:
        reap(second)
        if broker is not None:
            devbroker.stop(broker.data_dir)
    output = log.read_text()
    assert "the brokers answer after" in output and "Traceback" not in output, output[-3000:]


def test_a_replica_s_broker_watch_says_an_outage_once_and_its_end(
    kafka_broker: devbroker.Broker, tiny_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by a probe: in a 60 s outage a replica said nothing and had no metric, while it served a
    version the trainer had replaced meanwhile."""
    import logging

    from prometheus_client import CollectorRegistry, Gauge

    from dynft.replication.topics import BrokerWatch

    registry = CollectorRegistry()
    up = Gauge("up", "test", registry=registry)
    import threading

    watch = BrokerWatch([f"127.0.0.1:{free_port()}"], tiny_settings.kafka, up, threading.Event())
    with caplog.at_level(logging.WARNING, logger="dynft.replication.topics"):
        for _ in range(3):
            watch.check()
        assert registry.get_sample_value("up") == 0
        watch.servers = [kafka_broker.bootstrap]  # the brokers are back
        watch.check()
        assert registry.get_sample_value("up") == 1
    said = [r.getMessage() for r in caplog.records]
    assert sum("may be stale until they answer" in m for m in said) == 1, said
    assert sum("answer again after" in m for m in said) == 1, said
