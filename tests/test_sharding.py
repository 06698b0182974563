"""Task-sharded trainers through Kafka: two ``dynft train`` processes split four tasks, a real broker.

Each trainer holds a term over the source partitions the group gave it (``kafka.sharded``) and
trains only the tasks keyed to them; when one is killed (kill -9), the other takes its
partitions in a new life and its tasks go on from their newest published versions. Nothing is
shared but the broker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kafka import KafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from dynft.devbroker import Broker
from dynft.events import DEFAULT_TASK
from dynft.produce import produce
from dynft.replication.records import decode_pointer, decode_version, pointer_topic
from dynft.settings import Settings
from dynft.term import shard_topic, task_partition

from helpers import free_port, keyword_events, write_jsonl
from kafka_helpers import (
    ElectedTrainers,
    accounted,
    all_accounted,
    end_offsets,
    reap,
    topic_records,
    wait_until,
)

pytestmark = pytest.mark.slow
LABELS = ["alpha", "beta", "gamma"]
PARTITIONS = 4


def spread_tasks(partitions: int) -> list[str]:
    """One task name per partition (Kafka's default partitioner on the name as key)."""
    by_partition: dict[int, str] = {}
    for i in range(200):
        by_partition.setdefault(task_partition(f"task{i}", partitions), f"task{i}")
    assert len(by_partition) == partitions
    return [by_partition[p] for p in range(partitions)]


class Shards(ElectedTrainers):
    """Two sharded trainers of one configuration over a topic of ``PARTITIONS`` partitions."""

    def __init__(self, broker: Broker, settings: Settings, root: Path) -> None:
        extra = ("kafka.sharded=true", "registry.publish_every_steps=3", "registry.publish_interval_s=2")
        super().__init__(broker, settings, root, PARTITIONS, *extra, "model.max_length=32", "trainer.batch_size=8")

    def holders(self) -> dict[int, int]:
        """Partition -> pid of the newest term's holder."""
        out = {}
        for r in topic_records(self.broker.bootstrap, shard_topic(self.versions)):
            out[r.partition] = int(str(json.loads(r.value)["holder"]).rpartition(":")[2])
        return out

    def versions_by_task(self) -> dict[str, list[tuple[int, int, int | None]]]:
        """Task -> (version, epoch, parent) of its version records, in the topic's order."""
        out: dict[str, list[tuple[int, int, int | None]]] = {}
        for r in topic_records(self.broker.bootstrap, self.versions):
            if r.value is not None:
                record = decode_version(r.value)
                parent = json.loads(record.files["meta.json"]).get("parent")
                out.setdefault(record.task, []).append((record.version, record.epoch, parent))
        return out

    def publish(self, rows: list[dict[str, Any]]) -> None:
        path = write_jsonl(self.root / f"{uuid.uuid4().hex}.jsonl", rows)
        produce(path, [self.broker.bootstrap], self.topic, {}, key_field="task")

    def alive(self) -> bool:
        for i, proc in enumerate(self.procs):
            assert proc.poll() is None, f"trainer {'ab'[i]} exited: {self.log(i)}"
        return True


@pytest.fixture
def shards(kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path) -> Iterator[Shards]:
    made = Shards(kafka_broker, tiny_settings, tmp_path)
    try:
        yield made
    finally:
        made.stop_all()


def term_partitions(port: int) -> float | None:
    """``dynft_trainer_term_partitions`` as the trainer's /metrics says it now (None while it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        if family.name == "dynft_trainer_term_partitions":
            return float(family.samples[0].value)
    return None


def task_events(tasks: list[str], n: int, seed: int, prefix: str) -> list[dict[str, Any]]:
    rows = []
    for t, task in enumerate(tasks):
        for event in keyword_events(n, LABELS, seed=seed + t, prefix=f"{prefix}{task}-"):
            rows.append({**event, "task": task})
    return rows


def trained_by(states: list[Path], rows: list[dict[str, Any]]) -> dict[str, set[int]]:
    """Task -> which trainers' ledgers hold any of its events."""
    out: dict[str, set[int]] = {}
    for i, state in enumerate(states):
        seen = accounted([state], [r["id"] for r in rows])
        for r in rows:
            if seen[r["id"]][0] != "unseen":
                out.setdefault(r["task"], set()).add(i)
    return out


def test_two_sharded_trainers_split_the_tasks_and_one_takes_over_the_others(shards: Shards) -> None:
    tasks = spread_tasks(PARTITIONS)
    ports = [free_port(), free_port()]
    a = shards.spawn(0, "--metrics-port", str(ports[0]))
    wait_until(lambda: shards.alive() and set(shards.holders().values()) == {a.pid}, 240, "trainer a's term")
    b = shards.spawn(1, "--metrics-port", str(ports[1]))
    split = lambda: shards.alive() and set(shards.holders().values()) == {a.pid, b.pid}  # noqa: E731
    wait_until(split, 240, "the partitions to be split between the two trainers")
    owner = {task: shards.holders()[task_partition(task, PARTITIONS)] for task in tasks}
    assert sorted(owner.values()).count(a.pid) == 2, owner  # the sticky assignor splits 4 partitions 2 / 2
    held = lambda: [term_partitions(port) for port in ports] == [2.0, 2.0]  # noqa: E731
    wait_until(held, 60, "each trainer's metrics to show its two partitions")
    first = task_events(tasks, 120, seed=50, prefix="f")
    shards.publish(first)
    every_task_published = lambda: shards.alive() and set(shards.versions_by_task()) >= set(tasks)  # noqa: E731
    wait_until(every_task_published, 300, f"every task's first version: {shards.log(0)}\n{shards.log(1)}")
    wait_until(all_accounted(shards.states, [r["id"] for r in first]), 300, "the first events to be accounted for")

    # Each task was trained by one trainer, the owner of its partition, and its versions carry one epoch.
    by = trained_by(shards.states, first)
    pids = [a.pid, b.pid]
    assert {task: {pids[i] for i in who} for task, who in by.items()} == {t: {owner[t]} for t in tasks}
    before = shards.versions_by_task()
    assert DEFAULT_TASK not in before  # no event without a task: no default task's versions
    for task in tasks:
        assert len({epoch for _, epoch, _ in before[task]}) == 1, before[task]

    b.kill()  # kill -9: no last publish, no last commit
    b.wait()
    newest = {task: max(v for v, _, _ in shards.versions_by_task()[task]) for task in tasks}
    second = task_events(tasks, 80, seed=60, prefix="s")
    shards.publish(second)
    wait_until(lambda: set(shards.holders().values()) == {a.pid}, 120, f"trainer a's new term: {shards.log(0)}")
    wait_until(lambda: term_partitions(ports[0]) == 4.0, 60, "trainer a's metrics to show all four partitions")
    taken = {t for t in tasks if owner[t] == b.pid}

    def continued() -> bool:
        assert a.poll() is None, shards.log(0)
        found = shards.versions_by_task()
        return all(max(v for v, _, _ in found[t]) > newest[t] for t in taken)

    wait_until(continued, 300, f"b's tasks to go on in trainer a: {shards.log(0)}")
    after = shards.versions_by_task()
    for task in taken:
        (version, _, parent) = min(row for row in after[task] if row[0] > newest[task])
        assert parent == newest[task], f"task {task}: version {version} descends from {parent}, not {newest[task]}"
    ids = [r["id"] for r in first + second]
    wait_until(all_accounted(shards.states, ids), 300, f"every event to be accounted for: {shards.log(0)}")
    statuses = {status for status, _ in accounted(shards.states, ids).values()}
    assert statuses <= {"trained", "held_out", "buffered"}, statuses

    def committed_at_end() -> bool:
        ends, committed = end_offsets(shards.broker, shards.topic, shards.group)
        return ends == committed

    wait_until(committed_at_end, 120, f"commits at the log end: {shards.log(0)}")
    assert "rebuilt the replay buffer" in shards.whole_log(0), "the takeover warms up b's tasks from the stream"


def shard_epochs(shards: Shards) -> dict[tuple[str, int], list[int]]:
    """(topic, shard) -> the epochs of the shard's records on that topic, in the topic's order."""
    out: dict[tuple[str, int], list[int]] = {}
    decoders: dict[str, Callable[[bytes], Any]] = {
        shards.versions: decode_version,
        pointer_topic(shards.versions): decode_pointer,
    }
    for topic, decode in decoders.items():
        for r in topic_records(shards.broker.bootstrap, topic):
            if r.value is not None:
                record = decode(r.value)
                out.setdefault((topic, record.shard), []).append(record.epoch)
    return out


def test_a_paused_sharded_trainer_resumed_after_a_takeover_sends_no_more_than_its_record_in_flight(
    shards: Shards, tmp_path: Path
) -> None:
    tasks = spread_tasks(PARTITIONS)
    a = shards.spawn(0)
    wait_until(lambda: shards.alive() and set(shards.holders().values()) == {a.pid}, 240, "trainer a's term")
    b = shards.spawn(1)
    wait_until(lambda: shards.alive() and set(shards.holders().values()) == {a.pid, b.pid}, 240, "the split")
    shards.publish(task_events(tasks, 100, seed=70, prefix="f"))
    every_task_published = lambda: shards.alive() and set(shards.versions_by_task()) >= set(tasks)  # noqa: E731
    wait_until(every_task_published, 300, "every task's first version")
    os.kill(b.pid, signal.SIGSTOP)
    wait_until(lambda: set(shards.holders().values()) == {a.pid}, 120, f"trainer a's takeover: {shards.log(0)}")
    newest = {t: max(v for v, _, _ in shards.versions_by_task()[t]) for t in tasks}
    shards.publish(task_events(tasks, 60, seed=71, prefix="s"))
    taken_over = lambda: all(max(v for v, _, _ in shards.versions_by_task()[t]) > newest[t] for t in tasks)  # noqa: E731
    wait_until(taken_over, 300, f"every task's next version from trainer a: {shards.log(0)}")
    os.kill(b.pid, signal.SIGCONT)  # b rejoins: the partitions are split again, under new epochs
    rejoined = lambda: shards.alive() and set(shards.holders().values()) == {a.pid, b.pid}  # noqa: E731
    wait_until(rejoined, 240, f"the trainers to split the partitions again: {shards.log(1)}")
    shards.publish(task_events(tasks, 40, seed=72, prefix="t"))
    wait_until(all_accounted(shards.states, [f"t{t}-{i}" for t in tasks for i in range(40)]), 300, "the last events")
    found = shard_epochs(shards)
    assert {shard for _, shard in found} == set(range(PARTITIONS))
    # Per shard and topic, a record of a term after a newer one's: at most one in all. The feed
    # sends one record at a time and checks the term just before each, so a SIGSTOP landing
    # between the check and the send lets that one record out after SIGCONT (readers drop it:
    # PointerLog.admit_epoch); a second would mean b went on sending under its old term.
    late = [(where, e) for where, epochs in found.items() for i, e in enumerate(epochs) if e < max(epochs[: i + 1])]
    assert len(late) <= 1, (late, found)
    said = shards.whole_log(1)
    assert "lost its term" in said and "next life" in said, shards.log(1)


def test_every_sharded_dynft_run_serves_every_task_from_the_versions_topic(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path
) -> None:
    """Under `dynft run`, an elected trainer's server follows the versions topic (like a replica):
    each host answers for every task, not only for the tasks its trainer owns."""
    shards = Shards(kafka_broker, tiny_settings, tmp_path)
    tasks = spread_tasks(PARTITIONS)
    ports, procs = [free_port(), free_port()], []
    try:
        for i, port in enumerate(ports):
            cmd = [sys.executable, "-m", "dynft", "run", "--model", str(tiny_settings.model.path)]
            cmd += ["--state-dir", str(shards.states[i]), "--port", str(port), "--source", shards.settings.source.uri]
            cmd += [a for s in [*shards.extra, "checkpoint.interval_s=1", "trainer.lr=0.01"] for a in ("--set", s)]
            # A stuck join heals after max_poll_interval + session + 10 s (election.py): well inside the waits below.
            cmd += ["--set", "kafka.session_timeout_ms=6000", "--set", "kafka.max_poll_interval_ms=60000"]
            with open(tmp_path / f"run{i}.log", "ab") as out:
                procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT))
        try:
            # Both start at once: the race of a term written as the group moves its partition (election.py).
            wait_until(lambda: len(set(shards.holders().values())) == 2, 300, "two trainers to share the partitions")
            shards.publish(task_events(tasks, 120, seed=80, prefix="r"))
            wait_until(lambda: set(shards.versions_by_task()) >= set(tasks), 300, "every task's versions")
            for port in ports:
                for task in tasks:
                    serves = lambda port=port, task=task: predict(port, task) is not None  # noqa: E731
                    wait_until(serves, 120, f"port {port} to serve {task}")
                    assert predict(port, task) in LABELS, (port, task)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{run_log(tmp_path, 0)}\n{run_log(tmp_path, 1)}") from exc
        assert all(proc.poll() is None for proc in procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=90)
            finally:
                reap(proc)


def predict(port: int, task: str) -> str | None:
    """The label the server on ``port`` gives one text of ``task`` (None while it cannot answer)."""
    try:
        response = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json={"task": task, "texts": ["w1"]}, timeout=10)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return str(response.json()["predictions"][0]["label"])


def run_log(root: Path, i: int) -> str:
    """The run's log without kafka-python's chatter and the periodic status lines, which filled
    the tail of a failure's message and hid the election's lines."""
    path = root / f"run{i}.log"
    if not path.exists():
        return ""
    quiet = ("] events ", "] tasks | ", "KafkaTCPTransport", "KafkaConnection", "metadata", "Metadata")
    lines = [line for line in path.read_text().splitlines() if not any(q in line for q in quiet)]
    return "\n".join(lines)[-6000:]


def test_a_term_record_written_late_by_another_trainer_does_not_strand_the_owner(shards: Shards) -> None:
    """A trainer that wrote its term just as the group moved the partition away leaves a record
    after the new owner's; the owner, whom the group still gives the partition, takes it back."""
    tasks = spread_tasks(PARTITIONS)
    a = shards.spawn(0)
    wait_until(lambda: shards.alive() and set(shards.holders().values()) == {a.pid}, 240, "trainer a's term")
    b = shards.spawn(1)
    wait_until(lambda: shards.alive() and set(shards.holders().values()) == {a.pid, b.pid}, 240, "the split")
    mine = next(p for p, pid in shards.holders().items() if pid == b.pid)
    producer = KafkaProducer(bootstrap_servers=shards.broker.bootstrap)
    late = json.dumps({"epoch": 1, "holder": f"elsewhere:{a.pid}"}).encode()  # an old epoch, written last
    producer.send(shard_topic(shards.versions), key=b"term", value=late, partition=mine).get(30)
    producer.close()
    task = next(t for t in tasks if task_partition(t, PARTITIONS) == mine)
    shards.publish(task_events([task], 100, seed=90, prefix="l"))
    wait_until(
        lambda: shards.holders().get(mine) == b.pid, 120, f"trainer b to take its partition back: {shards.log(1)}"
    )
    wait_until(lambda: task in shards.versions_by_task(), 240, f"b to publish {task}: {shards.log(1)}")
    assert shards.alive() and "lost its term" in shards.whole_log(1)
