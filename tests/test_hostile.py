"""End to end: a real `dynft run` on a stream that mixes valid events with every kind of hostile
record in tests/hostile.py, from a file and from a real-broker topic.

What it proves: no record stops or restarts the trainer (``dynft_process_restarts_total`` stays 0,
scraped from /metrics), every id is in the ledger, each hostile record is dead-lettered once with
the reason of the rule it breaks (those without a usable id are in the dead letters only), and
the valid-despite-appearances ones are trained or held out.
"""

from __future__ import annotations

import math
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from hostile import HOSTILE, MAX_LABELS, REJECTED, SETTINGS, Hostile
from kafka import KafkaConsumer

from dynft.deadletter import read_dead_letters
from dynft.devbroker import Broker
from dynft.ledger import Ledger
from dynft.settings import Settings

from helpers import free_port, keyword_events, write_jsonl
from kafka_helpers import end_offsets, new_topic, publish, reap

pytestmark = pytest.mark.slow
LABELS = ["alpha", "beta", "gamma"]
assert len(LABELS) == MAX_LABELS  # so that the hostile record with a fourth label is beyond the cap


def mixed_stream(first: int = 40, gap: int = 4) -> tuple[list[object], list[str]]:
    """``first`` valid events (every label appears), then a hostile record before every ``gap`` more;
    and the valid ids."""
    good = keyword_events(first + gap * len(HOSTILE), LABELS, seed=91)
    rows: list[object] = list(good[:first])
    for n, hostile in enumerate(HOSTILE.values()):
        rows.append(hostile.raw)
        rows.extend(good[first + gap * n : first + gap * (n + 1)])
    return rows, [e["id"] for e in good]


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else math.nan


def run_until_done(settings: Settings, source: str, total: int, tmp_path: Path) -> str:
    """`dynft run` until it has an outcome for ``total`` records; SIGTERM; returns the last /metrics."""
    port, log = free_port(), tmp_path / "run.log"
    cmd = [sys.executable, "-m", "dynft", "run", "--model", str(settings.model.path), "--source", source]
    cmd += ["--state-dir", str(tmp_path / "state"), "--port", str(port), "--set", "checkpoint.interval_s=1"]
    for setting in SETTINGS:
        cmd += ["--set", setting]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    outcomes = ("trained", "held_out", "dead_lettered", "skipped")
    try:
        deadline, text, done = time.monotonic() + 300, "", 0.0  # a hang guard only
        while done < total:
            assert time.monotonic() < deadline, f"{done} of {total} records done: {log.read_text()[-3000:]}"
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            except httpx.HTTPError:
                continue
            done = sum(metric(text, f'dynft_events_total{{outcome="{o}"}}') for o in outcomes)
        assert done == total, "a record was counted twice"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, log.read_text()[-3000:]
    finally:
        reap(proc)
    for process in ("trainer", "server"):
        assert metric(text, f'dynft_process_restarts_total{{process="{process}"}}') == 0
    for reason, n in Counter(h.reason for h in REJECTED.values()).items():
        assert metric(text, f'dynft_events_rejected_total{{reason="{reason}"}}') == n, reason
    return text


def check_ledger(state: Path, good_ids: list[str]) -> None:
    """Every valid id trained or held out; every hostile record with a usable id under its outcome."""
    ledger = Ledger(state / "ledger.db")
    assert {status for status, _ in ledger.lookup(good_ids).values()} <= {"trained", "held_out"}
    for name, hostile in HOSTILE.items():
        if hostile.event_id is None:
            continue
        status, seen = ledger.lookup([hostile.event_id])[hostile.event_id]
        wanted = {"dead_lettered"} if hostile.reason else {"trained", "held_out"}
        assert status in wanted and seen == 1, (name, status, seen)
    assert ledger.counts()["dead_lettered"] == len(REJECTED)  # those without an id under their position


def check_letters(letters: list[tuple[bytes, str]]) -> None:
    """Each rejected kind dead-lettered once, with its reason (an over-long record may be cut)."""
    assert len(letters) == len(REJECTED)
    for name, hostile in REJECTED.items():
        found = [reason for raw, reason in letters if _same(raw, hostile)]
        assert found == [hostile.reason], (name, found)


def _same(raw: bytes, hostile: Hostile) -> bool:
    if hostile.reason == "record_too_large":
        return len(raw) > 0 and hostile.raw.startswith(raw)
    return raw == hostile.raw


def test_hostile_records_in_a_file_are_dead_lettered_and_training_goes_on(
    tiny_settings: Settings, tmp_path: Path
) -> None:
    rows, good_ids = mixed_stream()
    stream = write_jsonl(tmp_path / "stream.jsonl", rows)
    text = run_until_done(tiny_settings, f"file:{stream}", len(rows), tmp_path)
    assert metric(text, 'dynft_events_total{outcome="trained"}') > 0.8 * len(good_ids)
    state = tmp_path / "state"
    check_ledger(state, good_ids)
    letters = read_dead_letters(state / "dead-letter.jsonl")
    check_letters([(e["raw_bytes"], e["reason"]) for e in letters])
    assert all(e["detail"] for e in letters)


def test_hostile_records_on_a_topic_are_dead_lettered_and_training_goes_on(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path
) -> None:
    topic = new_topic(kafka_broker, partitions=1)  # one partition: the cap's fourth label comes after the three
    rows, good_ids = mixed_stream()
    publish(kafka_broker, topic, rows, tmp_path)
    source = f"kafka://{kafka_broker.bootstrap}/{topic}?group=hostile"
    run_until_done(tiny_settings, source, len(rows), tmp_path)
    check_ledger(tmp_path / "state", good_ids)
    ends, committed = end_offsets(kafka_broker, topic, "hostile")
    assert committed == ends  # every record, hostile ones included, was done with
    consumer = KafkaConsumer(
        f"{topic}.dlq", bootstrap_servers=kafka_broker.bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5000
    )
    try:
        letters = [(m.value, dict(m.headers)["dynft.reason"].decode()) for m in consumer]
    finally:
        consumer.close()
    check_letters(letters)
