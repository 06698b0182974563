"""Fault injection against real processes: kill -9, a torn adapter write, a broker outage, a killed
server, a poison stream. Each test kills or breaks something for real and checks afterwards that
the kill really happened, so none of them can pass without the fault."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dynft import devbroker
from dynft.devbroker import Broker
from dynft.produce import produce
from dynft.registry import AdapterRegistry
from dynft.settings import Settings

from helpers import free_port, keyword_events, write_jsonl
from kafka_helpers import accounted, all_accounted, end_offsets, ledger_of, new_topic, publish, reap, wait_until

pytestmark = pytest.mark.slow
LABELS = ["alpha", "beta", "gamma"]


def dynft(*args: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "dynft", *args], stdout=out, stderr=subprocess.STDOUT)


def kill9(proc: subprocess.Popen[bytes] | int) -> None:
    """SIGKILL, and proof that it was the kill that ended the process."""
    if isinstance(proc, int):
        os.kill(proc, signal.SIGKILL)
        return
    assert proc.poll() is None, "the process had already exited: the kill would prove nothing"
    proc.kill()
    assert proc.wait(30) == -signal.SIGKILL


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else math.nan


class Prober:
    """Sends predict requests in a thread and keeps every answer: (status, adapter version)."""

    def __init__(self, base: str) -> None:
        self.base, self.answers = base, []  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=10) as client:
            while not self._stop.is_set():
                try:
                    r = client.post("/v1/predict", json={"texts": ["w1 beta2 w7"]})
                    version = r.json().get("adapter_version") if r.status_code == 200 else None
                    self.answers.append((r.status_code, version))
                except httpx.HTTPError as exc:
                    self.answers.append((type(exc).__name__, None))
                time.sleep(0.05)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


def wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 150) -> int:
    """Until the server answers /readyz; returns the serving version."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            r = httpx.get(f"{base}/readyz", timeout=5)
            if r.status_code == 200:
                return int(r.json()["adapter_version"])
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"not ready in {timeout_s} s: {log.read_text()[-3000:]}")


def started_pids(log: Path, role: str) -> list[int]:
    return [int(p) for p in re.findall(rf"started {role} \(pid (\d+)\)", log.read_text())]


def test_kill_9_at_20_random_moments_loses_no_event(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path
) -> None:
    """Proves at-least-once under crashes: under `dynft run`, the trainer process is SIGKILLed at
    20 random moments while a 5,000-event stream (with malformed records) arrives, and the
    supervisor restarts it each time; afterwards every id is trained, held out or dead-lettered,
    none is missing, and the duplicates stay within one checkpoint interval per crash."""
    topic = new_topic(kafka_broker)
    rate = 50.0  # events/s, so that the stream is still arriving during the kills
    events = keyword_events(5000, LABELS, seed=31)
    rows: list[object] = list(events)
    bad = [b"{broken", b'{"id": "k-empty", "text": "", "label": "alpha"}', b"\xff\xfe\xfa"]
    for i, b in enumerate(bad):
        rows.insert(1500 * (i + 1), b)
    stream = write_jsonl(tmp_path / "stream.jsonl", rows)
    producer = threading.Thread(
        target=produce, args=(stream, [kafka_broker.bootstrap], topic, {}), kwargs={"rate": rate}, daemon=True
    )
    state, log, port = tmp_path / "state", tmp_path / "run.log", free_port()
    every_steps, batch = 5, 16  # one checkpoint interval trains at most every_steps * batch events
    args = ["run", "--model", str(tiny_settings.model.path), "--state-dir", str(state), "--port", str(port)]
    args += ["--source", f"kafka://{kafka_broker.bootstrap}/{topic}?group=crashy"]
    for setting in (
        f"checkpoint.every_steps={every_steps}",
        f"trainer.batch_size={batch}",
        "checkpoint.interval_s=1",
        "kafka.session_timeout_ms=6000",
        "run.restart_backoff_s=0.5",
        "run.restart_backoff_max_s=1",
        "kafka.group_instance_id=crashy-1",  # a restart takes its partitions back without a rebalance
    ):
        args += ["--set", setting]
    proc = dynft(*args, log=log)
    rng = random.Random(7)
    killed: list[int] = []
    lives_that_trained = 0
    try:
        wait_until(lambda: len(started_pids(log, "trainer")) == 1, 120, "the trainer to start")
        producer.start()
        while len(killed) < 20:
            wait_until(lambda: len(started_pids(log, "trainer")) == len(killed) + 1, 60, "the restart")
            pid = started_pids(log, "trainer")[-1]
            trained_before = ledger_of(state).counts()["trained"] if (state / "ledger.db").exists() else 0
            time.sleep(rng.uniform(0.5, 8.0))  # anywhere from loading the model to mid-stream training
            assert proc.poll() is None, log.read_text()[-3000:]
            kill9(pid)
            killed.append(pid)
            if (state / "ledger.db").exists() and ledger_of(state).counts()["trained"] > trained_before:
                lives_that_trained += 1
        # The kills were real: each killed pid was followed by a restart that the log reports.
        wait_until(lambda: len(started_pids(log, "trainer")) == 21, 60, "the last restart")
        assert len(set(started_pids(log, "trainer"))) == 21
        assert lives_that_trained >= 5, f"only {lives_that_trained} of 20 killed trainers had trained anything"
        producer.join(240)
        assert not producer.is_alive()
        ids = [e["id"] for e in events]
        wait_until(all_accounted([state], ids), 480, "every id")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
    finally:
        reap(proc)
    assert len(re.findall(r"trainer exited with code -9", log.read_text())) == 20
    result = accounted([state], ids)
    missing = [i for i, (s, _) in result.items() if s not in ("trained", "held_out")]
    assert missing == [], f"{len(missing)} events lost, e.g. {missing[:5]}"
    assert ledger_of(state).counts()["dead_lettered"] >= len(bad)  # each malformed record, maybe again
    duplicates = sum(seen - 1 for _, seen in result.values())
    assert duplicates <= len(killed) * every_steps * batch, f"{duplicates} duplicates after {len(killed)} crashes"
    ends, committed = end_offsets(kafka_broker, topic, "crashy")
    assert committed == ends


WRITER = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from dynft.registry import AdapterRegistry, AdapterState
    reg = AdapterRegistry(Path(sys.argv[1]))
    print("cleaned", reg.clean_staging(), flush=True)
    torch.manual_seed(int(sys.argv[2]))
    # 8 MB of weights per version: a write long enough to be caught in the middle.
    state = AdapterState({"w": torch.randn(2048, 1024)}, ["a", "b"], {"peft_type": "LORA"})
    while True:
        reg.publish(state, {"step": 1})
    """
)


def half_written(root: Path) -> list[str]:
    """Staging directories holding files: a version being written (racing with its rename)."""
    out = []
    for path in list((root / ".staging").iterdir()):
        try:
            if any(path.iterdir()):
                out.append(path.name)
        except FileNotFoundError:  # renamed into versions/ meanwhile
            continue
    return out


def test_kill_9_during_an_adapter_write_leaves_no_partial_version(tmp_path: Path) -> None:
    """Proves registry atomicity: a publishing process is SIGKILLed while a version is being
    written (the half-written staging directory is seen on disk after the kill); a restart cleans
    it up, and every version under ``versions/`` is complete and loads with a matching hash."""
    root = tmp_path / "registry"
    AdapterRegistry(root)
    torn, left_behind, attempts = 0, [], 0
    # A kill lands between the check and the signal, so it may miss the write (the rename wins
    # the race, more often on a loaded machine: 2 of 15 once under `make test`'s two workers):
    # kill until three kills have torn a write, and at least five times.
    while attempts < 5 or (torn < 3 and attempts < 40):
        newest_before = max(AdapterRegistry(root).versions(), default=0)
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(root), str(attempts)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        attempts += 1
        assert proc.stdout is not None
        first = proc.stdout.readline().decode()
        assert first.startswith("cleaned"), first
        if left_behind:  # the restart removed what the previous kill left half-written
            assert all(name in first for name in left_behind), (first, left_behind)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # a new version since the restart, and one being written
                if half_written(root) and max(AdapterRegistry(root).versions(), default=0) > newest_before:
                    kill9(proc)
                    break
        finally:
            reap(proc)
            proc.stdout.close()
        left_behind = half_written(root)
        torn += bool(left_behind)
        registry = AdapterRegistry(root)
        for version in registry.versions():
            state, meta = registry.load(version)  # raises on a missing file or a hash mismatch
            assert meta["version"] == version and state.tensors["w"].shape == (2048, 1024)
    assert torn >= 3, f"only {torn} of {attempts} kills hit a write in progress"
    if left_behind:
        assert set(left_behind) <= set(AdapterRegistry(root).clean_staging())
    assert list((root / ".staging").iterdir()) == []


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker of this test's own, which it may stop and start."""
    broker = devbroker.start(tmp_path / "kafka")
    try:
        yield broker
    finally:
        devbroker.stop(tmp_path / "kafka")


def test_a_30_second_broker_outage_is_survived(private_broker: Broker, tiny_settings: Settings, tmp_path: Path) -> None:
    """Proves outage tolerance: the broker is stopped for 30 s mid-stream and restarted on its old
    data; the daemon logs the outage and the recovery, the server answers every request meanwhile,
    and every event (before and after the outage) is trained with none lost."""
    topic = new_topic(private_broker)
    first, second = keyword_events(1500, LABELS, seed=41), keyword_events(1500, LABELS, seed=42, prefix="o")
    publish(private_broker, topic, first, tmp_path)
    port, state, log = free_port(), tmp_path / "state", tmp_path / "run.log"
    args = ["run", "--model", str(tiny_settings.model.path), "--state-dir", str(state), "--port", str(port)]
    args += ["--source", f"kafka://{private_broker.bootstrap}/{topic}?group=outage"]
    args += ["--set", "checkpoint.interval_s=1", "--set", "kafka.lag_interval_s=1", "--set", "trainer.lr=0.01"]
    args += ["--set", "registry.publish_every_steps=20"]
    proc = dynft(*args, log=log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, log)
        with Prober(base) as prober:
            devbroker.stop(private_broker.data_dir)
            down_at = time.monotonic()
            time.sleep(30)
            during = list(prober.answers)
            devbroker.start(
                private_broker.data_dir, port=private_broker.port, controller_port=private_broker.controller_port
            )
            assert time.monotonic() - down_at >= 30
            publish(private_broker, topic, second, tmp_path)
            ids = [e["id"] for e in first + second]
            wait_until(all_accounted([state], ids), 360, "every id")
        assert len(during) > 100, "the server was hardly asked during the outage"
        assert all(status == 200 for status, _ in prober.answers), {s for s, _ in prober.answers}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
    finally:
        reap(proc)
    output = log.read_text()
    assert "kafka outage: the brokers do not answer" in output
    assert re.search(r"kafka is back after \d+ s", output), output[-3000:]
    result = accounted([state], [e["id"] for e in first + second])
    assert {s for s, _ in result.values()} <= {"trained", "held_out"}
    ends, committed = end_offsets(private_broker, topic, "outage")
    assert committed == ends


def test_a_killed_server_is_back_with_the_current_version_within_10_seconds(
    tiny_settings: Settings, tmp_path: Path
) -> None:
    """Proves supervision of the server: its process is SIGKILLed; `dynft run` restarts it, says
    so in the log and the restart counter, and within 10 s it serves the version it served before."""
    stream = write_jsonl(tmp_path / "stream.jsonl", keyword_events(600, LABELS, seed=51))
    port, log = free_port(), tmp_path / "run.log"
    args = ["run", "--model", str(tiny_settings.model.path), "--state-dir", str(tmp_path / "state")]
    args += ["--source", f"file:{stream}", "--port", str(port), "--set", "registry.publish_every_steps=20"]
    proc = dynft(*args, log=log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, log)
        time.sleep(3)  # let the stream finish so that the serving version stays put
        before = wait_ready(base, proc, log)
        pids = [int(p) for p in re.findall(r"started server \(pid (\d+)\)", log.read_text())]
        assert len(pids) == 1
        kill9(pids[0])
        killed_at = time.monotonic()
        back, version = None, None
        while time.monotonic() - killed_at < 30:
            try:
                r = httpx.post(f"{base}/v1/predict", json={"texts": ["w2 gamma1"]}, timeout=2)
                if r.status_code == 200:
                    back, version = time.monotonic() - killed_at, r.json()["adapter_version"]
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        assert back is not None and back <= 10, f"back after {back} s"
        assert version >= before
        assert version == AdapterRegistry(tmp_path / "state" / "registry").serving().version
        pids = [int(p) for p in re.findall(r"started server \(pid (\d+)\)", log.read_text())]
        assert len(pids) == 2 and pids[1] != pids[0]
        text = httpx.get(f"{base}/metrics").text
        assert metric(text, 'dynft_process_restarts_total{process="server"}') == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
    finally:
        reap(proc)


def test_a_poison_stream_never_publishes_or_serves_a_non_finite_adapter(
    tiny_settings: Settings, tmp_path: Path
) -> None:
    """Proves the non-finite guard end to end: a stream whose later events carry weights that
    overflow the loss, trained at a learning rate far too high, under `dynft run`. Steps are
    skipped and counted; every published version is finite; the server answers with finite
    probabilities from a finite version."""
    rows: list[dict[str, object]] = list(keyword_events(300, LABELS, seed=61))
    for i, event in enumerate(keyword_events(900, LABELS, seed=62, prefix="p")):
        rows.append({**event, "weight": 1e308} if i % 2 else event)
    stream = write_jsonl(tmp_path / "stream.jsonl", rows)
    port, log, state = free_port(), tmp_path / "run.log", tmp_path / "state"
    args = ["run", "--model", str(tiny_settings.model.path), "--state-dir", str(state), "--port", str(port)]
    args += ["--source", f"file:{stream}", "--set", "registry.publish_every_steps=10"]
    args += [
        "--set",
        "trainer.lr=1",
        "--set",
        "trainer.head_lr=1",
        "--set",
        "trainer.warmup_steps=1",
        "--set",  # events.max_weight (default 1000) would dead-letter the poison before it reaches the trainer
        "events.max_weight=1e308",
    ]  # the most allowed
    proc = dynft(*args, log=log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, text = time.monotonic() + 150, ""
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                text = httpx.get(f"{base}/metrics", timeout=5).text
            except httpx.HTTPError:
                time.sleep(0.5)
                continue
            outcomes = ("trained", "skipped", "held_out")
            done = sum(metric(text, f'dynft_events_total{{outcome="{o}"}}') for o in outcomes)
            if done >= 0.95 * len(rows):  # the whole stream went through (replayed rows aside)
                break
            time.sleep(0.5)
        skipped = sum(
            metric(text, f'dynft_train_steps_skipped_total{{reason="{r}"}}')
            for r in ("non_finite_loss", "non_finite_grad")
        )
        assert skipped > 0, "no step was skipped: the stream was not poisonous"
        registry = AdapterRegistry(state / "registry")
        assert registry.versions(), "nothing was published"
        for version in registry.versions():
            tensors = registry.load(version)[0].tensors
            assert all(bool(t.isfinite().all()) for t in tensors.values()), f"version {version} is not finite"
        r = httpx.post(f"{base}/v1/predict", json={"texts": ["w1 alpha1 w2"]}, timeout=10)
        if r.status_code == 200:  # a version serves: its scores are finite
            scores = json.dumps(r.json())
            assert "NaN" not in scores and "Infinity" not in scores
            # 0: nothing was promoted and the fast path's prototypes answer (dynft.serving.prototypes)
            assert r.json()["adapter_version"] in [0, *registry.versions()]
        else:  # nothing passed the gate: the server says so instead of serving garbage
            assert r.status_code == 503, r.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
    finally:
        reap(proc)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: its parent, the fork server, may not have reaped it yet.
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"


def test_children_stop_when_the_supervisor_is_killed(tiny_settings: Settings, tmp_path: Path) -> None:
    """Proves no orphans: `dynft run` is SIGKILLed (no chance to stop its children); the trainer
    and the server notice and stop by themselves, and the port is released."""
    stream = write_jsonl(tmp_path / "stream.jsonl", keyword_events(300, LABELS, seed=71))
    port, log = free_port(), tmp_path / "run.log"
    args = ["run", "--model", str(tiny_settings.model.path), "--state-dir", str(tmp_path / "state")]
    args += ["--source", f"file:{stream}", "--port", str(port)]
    proc = dynft(*args, log=log)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, log)
        children = started_pids(log, "trainer") + started_pids(log, "server")
        assert len(children) == 2 and all(alive(pid) for pid in children)
        kill9(proc)
        wait_until(lambda: not any(alive(pid) for pid in children), 60, "the children to stop")
    finally:
        reap(proc)
    assert "the supervisor" in log.read_text() and "is gone; stopping" in log.read_text()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
