"""Helpers for tests against the real Kafka broker: topics, publishing, offsets, trainer processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from dynft.devbroker import Broker
from dynft.election import Election
from dynft.ledger import Ledger
from dynft.produce import ensure_topic, produce
from dynft.settings import Settings
from dynft.term import TermView

from helpers import write_jsonl


def new_topic(broker: Broker, partitions: int = 3) -> str:
    topic = f"events-{uuid.uuid4().hex[:8]}"
    ensure_topic([broker.bootstrap], topic, partitions, {})
    return topic


def publish(broker: Broker, topic: str, rows: list[object], tmp_path: Path) -> None:
    produce(write_jsonl(tmp_path / f"{uuid.uuid4().hex}.jsonl", rows), [broker.bootstrap], topic, {})


def damage(broker: Broker, topic: str, partition: int, marker: bytes, byte: bytes) -> None:
    """Overwrite the first byte of ``marker`` in the partition's log segment, in place: the
    broker serves its log without checking CRCs, so the consumer meets the damage."""
    (segment,) = (broker.data_dir / "logs" / f"{topic}-{partition}").glob("*.log")
    with segment.open("r+b") as f:
        at = f.read().index(marker)
        f.seek(at)
        f.write(byte)


def end_offsets(broker: Broker, topic: str, group: str) -> tuple[dict[int, int], dict[int, int]]:
    """(log end, committed) offset per partition."""
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=group, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        ends = consumer.end_offsets(parts)
        return {tp.partition: ends[tp] for tp in parts}, {tp.partition: consumer.committed(tp) or 0 for tp in parts}
    finally:
        consumer.close()


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def kafka_settings(settings: Settings, broker: Broker, topic: str, group: str) -> Settings:
    settings.source.uri = f"kafka://{broker.bootstrap}/{topic}?group={group}"
    settings.checkpoint.interval_s = 1.0
    settings.kafka.lag_interval_s = 0.5
    return settings


def ledger_of(state_dir: Path) -> Ledger:
    return Ledger(state_dir / "ledger.db")


def trainer_process(settings: Settings, state_dir: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "dynft",
        "train",
        "--model",
        str(settings.model.path),
        "--source",
        settings.source.uri,
        "--state-dir",
        str(state_dir),
        "--set",
        "trainer.lr=0.01",
        "--set",
        "checkpoint.interval_s=1",
        "--set",
        "kafka.session_timeout_ms=6000",
        "--set",  # a stuck rejoin is abandoned after this + the session + 10 s (see KafkaSource)
        "kafka.max_poll_interval_ms=20000",
        *extra,
    ]
    with open(log, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def accounted(state_dirs: list[Path], ids: list[str]) -> dict[str, tuple[str, int]]:
    """Each id's status across the given ledgers (trained or held out anywhere wins), and total deliveries."""
    out: dict[str, tuple[str, int]] = {i: ("unseen", 0) for i in ids}
    for state_dir in state_dirs:
        if not (state_dir / "ledger.db").exists():
            continue
        for event_id, (status, seen) in ledger_of(state_dir).lookup(ids).items():
            old_status, old_seen = out[event_id]
            out[event_id] = (status if status != "unseen" else old_status, old_seen + seen)
    return out


def all_accounted(state_dirs: list[Path], ids: list[str]) -> Callable[[], bool]:
    """A ``wait_until`` condition: every id has an outcome in one of the ledgers."""
    return lambda: all(status != "unseen" for status, _ in accounted(state_dirs, ids).values())


def reap(proc: subprocess.Popen[bytes]) -> None:
    """For ``finally``: kill a process a failed test left running, and collect it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()


class ElectedTrainers:
    """Two ``dynft train`` processes of one elected configuration (``kafka.election``), each with
    its own state directory and log (``a``, ``b``) under ``root``; ``spawn`` starts one."""

    def __init__(self, broker: Broker, settings: Settings, root: Path, partitions: int, *extra: str) -> None:
        self.broker, self.root = broker, root
        self.topic = new_topic(broker, partitions)
        self.group = f"elected-{uuid.uuid4().hex[:6]}"
        self.versions = f"versions-{uuid.uuid4().hex[:8]}"
        self.settings = kafka_settings(settings, broker, self.topic, self.group)
        self.states = [root / "a", root / "b"]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.extra = ["kafka.election=true", f"kafka.versions_topic={self.versions}", "trainer.threads=1", *extra]

    def spawn(self, i: int, *options: str) -> subprocess.Popen[bytes]:
        args = [a for s in self.extra for a in ("--set", s)]
        proc = trainer_process(self.settings, self.states[i], self.root / f"{'ab'[i]}.log", *args, *options)
        self.procs.append(proc)
        return proc

    def log(self, i: int) -> str:
        """The tail of trainer i's log, for a failure message."""
        return self.whole_log(i)[-6000:]

    def whole_log(self, i: int) -> str:
        """All of trainer i's log, for asserting on what it said: a tail can lose an early line."""
        return (self.root / f"{'ab'[i]}.log").read_text()

    def stop_all(self) -> None:
        """For a fixture's teardown: SIGTERM (after SIGCONT, for a paused one) and collect each."""
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            finally:
                reap(proc)


def topic_records(bootstrap: str, topic: str) -> list[Any]:
    """Every record of ``topic``, partition by partition, each in order (none while the topic does
    not exist: reading it does not create it)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        if topic not in consumer.topics():
            return []
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        out: dict[int, list[Any]] = {tp.partition: [] for tp in parts}
        while any(consumer.position(tp) < ends[tp] for tp in parts):
            for tp, batch in consumer.poll(timeout_ms=500).items():
                out[tp.partition] += batch
        return [record for p in sorted(out) for record in out[p]]
    finally:
        consumer.close()


def start_and_hold(election: Election, timeout_s: float = 90.0) -> TermView:
    """Start ``election`` and wait until it holds a term (failing the test after ``timeout_s``)."""
    election.start()
    stop = threading.Event()
    give_up = threading.Timer(timeout_s, stop.set)
    give_up.start()
    try:
        view = election.wait(stop)
    finally:
        give_up.cancel()
    assert view is not None and election.holding, f"no term within {timeout_s:.0f} s"
    return view
