"""Kafka ingest: events/s from a topic into the replay buffer with training paused.

dynft's path is the one the daemon runs: the Kafka source of the default settings (its consumer
in a child process, ``dynft.sources.kafka_process``) polled by the ``Intake`` thread into
its bounded queue, then, on a second thread as in the daemon, decoding and validation of every
record, held-out routing, and ``ReplayBuffer.add``. The baseline is kafka-python's bare
consumer loop over the same topic (poll and count, nothing else), in the same run. Both read
all partitions from the beginning with a fresh group; the clock starts at the first record.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer
from prometheus_client import CollectorRegistry

from benchmarks.common import Result, in_fresh_process, progress, rounded, skipped
from benchmarks.plans import Plan
from dynft import devbroker
from dynft.buffer import ReplayBuffer
from dynft.evaluation import is_held_out
from dynft.events import Rejection, decode
from dynft.produce import ensure_topic
from dynft.runtime import tune_gc
from dynft.settings import EventSettings, KafkaSettings, SourceSettings
from dynft.sources import Intake, open_source
from dynft.sources.demo import load_demo_rows


def fill_topic(bootstrap: str, topic: str, n: int) -> None:
    ensure_topic([bootstrap], topic, 3, {})
    rows = load_demo_rows()
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=512 * 1024)
    for i in range(n):
        row = rows[i % len(rows)]
        producer.send(topic, json.dumps({"id": f"b{i}", "text": row["text"], "label": row["label"]}).encode())
    producer.flush()
    producer.close()


def bare_consumer(bootstrap: str, topic: str, n: int) -> tuple[float, float]:
    """Events/s and CPU-seconds (all threads of the process) per event."""
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"bare-{uuid.uuid4().hex[:6]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=2000,
    )
    seen, started, cpu = 0, 0.0, 0.0
    try:
        while seen < n:
            for records in consumer.poll(timeout_ms=1000).values():
                if not started:
                    started, cpu = time.perf_counter(), time.process_time()
                seen += len(records)
        return n / (time.perf_counter() - started), (time.process_time() - cpu) / n
    finally:
        consumer.close()


def dynft_ingest(bootstrap: str, topic: str, n: int) -> tuple[float, float, int]:
    """Events/s, CPU-seconds per event (all threads of the process and of its consumer process), and
    the rejected count."""
    uri = f"kafka://{bootstrap}/{topic}?group=dynft-{uuid.uuid4().hex[:6]}"
    source = open_source(SourceSettings(uri=uri), KafkaSettings(), CollectorRegistry())
    intake = Intake(source, SourceSettings().queue_size)
    buffer = ReplayBuffer(10_000, 64 << 20, "class_balanced")
    limits = EventSettings()
    done = threading.Event()
    counts = {"seen": 0, "rejected": 0}
    started = [0.0, 0.0]  # wall clock and process CPU time at the first record

    def consume() -> None:  # the batching thread's work, without tokenization (training is paused)
        while counts["seen"] < n:
            records = intake.take(512, 0.5)
            if records and not started[0]:
                started[:] = time.perf_counter(), time.process_time() + child_cpu_s(source)
            fresh = []
            for record in records:
                event = decode(record.raw, limits)
                if isinstance(event, Rejection):
                    counts["rejected"] += 1
                elif not is_held_out(event.id, event.text, 0.1):
                    fresh.append(event)
            buffer.add_many(fresh)
            counts["seen"] += len(records)
        done.set()

    intake.start()
    tune_gc()  # as the daemon does after start-up
    worker = threading.Thread(target=consume)
    worker.start()
    try:
        worker.join(600)
        elapsed = time.perf_counter() - started[0]
        cpu = time.process_time() + child_cpu_s(source) - started[1]
    finally:
        intake.stop()
    return n / elapsed, cpu / n, counts["rejected"]


def child_cpu_s(source: object) -> float:
    """CPU-seconds the source's consumer process has used so far (0 for a source in this process)."""
    pid = getattr(source, "pid", None)
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


NAME = "kafka ingest"


def missing_broker() -> str | None:
    """Why the development broker cannot start here, or None."""
    if shutil.which("java") is None:
        return "no java on PATH for the Kafka broker"
    libs = devbroker.KAFKA_DIR / "libs"
    if not any(libs.glob("kafka_2.13-*.jar")):
        return f"no Kafka broker jars in {libs} (make deploy/kafka/libs/.fetched)"
    return None


def run(plan: Plan, bootstrap: str | None = None) -> list[Result]:
    n = plan.ingest_events
    if not n:
        return [skipped(NAME, f"not part of the {plan.suite} suite")]
    reason = None if bootstrap else missing_broker()
    if reason:
        return [skipped(NAME, reason)]
    with tempfile.TemporaryDirectory() as tmp:
        broker = None if bootstrap else devbroker.start(Path(tmp) / "kafka")
        address = bootstrap or (broker.bootstrap if broker else "")
        try:
            topic = f"ingest-{uuid.uuid4().hex[:8]}"
            fill_topic(address, topic, n)
            bare, ours = [], []
            progress(f"  ingest: {n} events in the topic; bare consumer and dynft intake, interleaved twice ...")
            for _ in range(2):  # interleaved, so drift in the machine's load hits both
                bare.append(in_fresh_process(plan.isolate, bare_consumer, address, topic, n))
                ours.append(in_fresh_process(plan.isolate, dynft_ingest, address, topic, n))
        finally:
            if broker is not None:
                devbroker.stop(broker.data_dir)
    (best_bare, bare_cpu), (best_ours, ours_cpu, rejected) = max(bare), max(ours)
    ratio = best_ours / best_bare
    return [
        Result(
            name=NAME,
            metric="events into the buffer (training paused)",
            unit="events/s",
            dynft=best_ours,
            baseline=best_bare,
            baseline_name="kafka-python bare poll loop",
            goal="ratio >= 0.8 and >= 20,000 events/s",
            met=ratio >= 0.8 and best_ours >= 20_000,
            details={
                "events": n,
                "partitions": 3,
                "runs": "best of 2",
                "rejected": rejected,
                "CPU-seconds per event (all threads, both processes), dynft": f"{ours_cpu * 1e6:.1f} us",
                "CPU-seconds per event (all threads), bare": f"{bare_cpu * 1e6:.1f} us",
                "CPU ratio (dynft / bare, best runs)": rounded(ours_cpu / bare_cpu),
                "all runs dynft": [round(x) for x, _, _ in ours],
                "all runs bare": [round(x) for x, _ in bare],
            },
        )
    ]
