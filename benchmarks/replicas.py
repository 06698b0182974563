"""Serving replicas on Kafka: how fast a promotion reaches every replica, and how fast one starts.

Propagation: a local registry holds ``PROMOTIONS + 1`` distinct versions of the serving model's
adapter (one head row perturbed per version), sent to the versions topic by the trainer's own
feed; three ``dynft serve --follow`` processes follow it. Each promotion (registry promote +
``VersionsFeed.sync``, as the publisher does) is timed until all three replicas report it
loaded (``/readyz``). Baseline: a bare Kafka round trip, one record produced and seen
by three plain consumers (the floor any Kafka-borne propagation stands on).

Start-up: one replica started alone, process start to its first answer (reads the topic,
loads the model, flips to the current version). Baseline: ``dynft serve`` on a state directory
that already holds the same registry (the co-located server's start). Each is started
``START_ROUNDS`` times, alternately, and the fastest start of each counts.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import Result, percentile, progress, rounded, skipped
from benchmarks.ingest import missing_broker
from benchmarks.plans import Plan
from dynft import devbroker

NAME = "replica propagation"
PROMOTIONS = 50
REPLICAS = 3
START_ROUNDS = 2  # start-up: the fastest of this many starts of each kind
TOKEN = "bench-token"


def run(plan: Plan) -> list[Result]:
    if plan.suite == "smoke":
        return [skipped(f"{NAME} p95", "not part of the smoke suite (three model processes and a broker)")]
    reason = missing_broker()
    if reason:
        return [skipped(f"{NAME} p95", reason)]
    with tempfile.TemporaryDirectory(prefix="dynft-replicas-") as tmp:
        root = Path(tmp)
        broker = devbroker.start(root / "kafka")
        try:
            return measure(plan, root, broker.bootstrap)
        finally:
            devbroker.stop(broker.data_dir)


def measure(plan: Plan, root: Path, bootstrap: str) -> list[Result]:
    from dynft.replication.feed import VersionsFeed
    from dynft.settings import load_settings

    topic = f"versions-{uuid.uuid4().hex[:6]}"
    settings = load_settings(
        overrides={"state_dir": str(root / "trainer"), "model.path": plan.model_path, "kafka.versions_topic": topic}
    )
    registry = publish_versions(settings, PROMOTIONS + 1)
    registry.promote(1, reason="bench: first")
    feed = VersionsFeed(settings, registry, [bootstrap], topic)
    feed.sync()
    follow = f"kafka://{bootstrap}/{topic}"
    procs = [start_server(plan, root / f"replica{i}", follow) for i in range(REPLICAS)]
    try:
        wait_all([p[1] for p in procs], 1, 600)
        progress(f"  {REPLICAS} replicas serve v1; promoting {PROMOTIONS} versions")
        latencies = []
        for version in range(2, PROMOTIONS + 2):
            started = time.perf_counter()
            registry.promote(version, reason="bench")
            feed.sync()
            wait_all([p[1] for p in procs], version, 60)
            latencies.append(time.perf_counter() - started)
    finally:
        for proc, _ in procs:
            stop_process(proc)
        feed.close()
    bare = bare_round_trips(bootstrap, PROMOTIONS)
    starts: dict[str, list[float]] = {"replica": [], "local": []}
    for i in range(START_ROUNDS):  # alternated, so that a burst of load elsewhere hits both alike
        starts["replica"].append(time_start(plan, root / f"late{i}", follow))
        shutil.copytree(root / "replica0" / "registry", root / f"local{i}" / "registry")
        starts["local"].append(time_start(plan, root / f"local{i}", None))
    start_dynft, start_local = min(starts["replica"]), min(starts["local"])
    start_details = {
        "model": plan.model,
        "rounds": START_ROUNDS,
        "replica_s": [rounded(x) for x in starts["replica"]],
        "local_s": [rounded(x) for x in starts["local"]],
        "replica_log": catch_up_line(root / "late0.log"),
    }
    p50, p95, b50, b95 = (percentile(x, q) for x, q in ((latencies, 50), (latencies, 95), (bare, 50), (bare, 95)))
    what, bare_name = "promotion -> all replicas serve it", "bare Kafka round trip to 3 consumers"
    details = {"promotions": len(latencies), "replicas": REPLICAS, "max_s": rounded(max(latencies))}
    return [
        Result(f"{NAME} p50", what, "s", p50, b50, bare_name,
               higher_is_better=False, details=details),
        Result(f"{NAME} p95", what, "s", p95, b95, bare_name,
               higher_is_better=False, goal="<= 2 s", met=p95 <= 2.0, details=details),
        Result("replica start-up", "process start -> first answer, alone", "s", start_dynft, start_local,
               "dynft serve on a local registry", higher_is_better=False, goal="<= 15 s", met=start_dynft <= 15.0,
               details=start_details),
    ]  # fmt: skip


def publish_versions(settings: Any, count: int) -> Any:
    """``count`` versions of one exported adapter, each with a different head row, in a fresh registry."""
    import torch

    from benchmarks.swap import demo_events
    from dynft.events import Event
    from dynft.model import model_fingerprint, resolve_model_path, resolve_pooling
    from dynft.registry import AdapterRegistry, AdapterState
    from dynft.trainer import build_trainer

    trainer = build_trainer(settings.model, settings.adapter, settings.trainer)
    events = [Event(**e) for e in demo_events(32, seed=3)]
    trainer.step(trainer.collator(events, n_fresh=32))
    state = trainer.export()
    path = resolve_model_path(settings.model.path)
    fingerprint = model_fingerprint(path, resolve_pooling(path, settings.model.pooling))
    registry = AdapterRegistry(settings.registry_dir, keep_last=count + 1)
    head = next(k for k, t in state.tensors.items() if t.dim() == 2 and t.shape[0] == len(state.labels))
    for i in range(count):
        tensors = dict(state.tensors)
        tensors[head] = state.tensors[head] + torch.randn_like(state.tensors[head]) * 0.01 * (i + 1)
        registry.publish(AdapterState(tensors, state.labels, state.peft_config), {"base_model": fingerprint})
    return registry


def catch_up_line(log: Path) -> str:
    """The replica's own account of its start (topics checked, read to their end)."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if "checked the versions topics" in line]
    return lines[0].split("] ", 1)[-1] if lines else "not logged"


def start_server(plan: Plan, state_dir: Path, follow: str | None) -> tuple[subprocess.Popen[bytes], str]:
    from dynft.cli import main  # noqa: F401  (fail here, not in the child, if the CLI is broken)

    port = devbroker.free_port()
    cmd = [sys.executable, "-m", "dynft", "serve", "--model", plan.model_path, "--state-dir", str(state_dir)]
    cmd += ["--port", str(port), "--set", f"server.admin_token={TOKEN}"]  # the default watcher interval
    if follow is not None:
        cmd += ["--follow", follow]
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir.parent / f"{state_dir.name}.log", "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def loaded(url: str) -> int | None:
    """The version a replica answers with, from ``/readyz`` (``/v1/adapters`` reads every version's
    meta.json: polled a hundred times a second on three replicas, it loaded the CPUs it measured)."""
    try:
        return httpx.get(url + "/readyz", timeout=5).json().get("adapter_version")  # type: ignore[no-any-return]
    except (httpx.HTTPError, ValueError, AttributeError):
        return None


def wait_all(urls: list[str], version: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(urls)
    while pending:
        pending = [u for u in pending if loaded(u) != version]
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} replica(s) do not serve v{version} after {timeout_s} s")
        if pending:
            time.sleep(0.01)


def time_start(plan: Plan, state_dir: Path, follow: str | None) -> float:
    started = time.perf_counter()
    proc, url = start_server(plan, state_dir, follow)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}; see {state_dir}.log")
            try:
                if httpx.post(url + "/v1/predict", json={"texts": ["hello"]}, timeout=5).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def bare_round_trips(bootstrap: str, count: int) -> list[float]:
    """Produce one record at a time; the time until three plain consumers have each seen it."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    topic = f"bare-{uuid.uuid4().hex[:6]}"
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    producer.send(topic, b"warm-up").get(30)
    seen: list[dict[int, float]] = [{} for _ in range(REPLICAS)]
    stop = threading.Event()

    def consume(i: int) -> None:
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_end(tp)
        consumer.position(tp)
        ready[i].set()
        while not stop.is_set():
            for records in consumer.poll(timeout_ms=100).values():
                for record in records:
                    seen[i][int(record.value)] = time.perf_counter()
        consumer.close()

    ready = [threading.Event() for _ in range(REPLICAS)]
    threads = [threading.Thread(target=consume, args=(i,), daemon=True) for i in range(REPLICAS)]
    for thread in threads:
        thread.start()
    for event in ready:
        event.wait(60)
    out = []
    for n in range(count):
        started = time.perf_counter()
        producer.send(topic, str(n).encode()).get(30)
        deadline = time.monotonic() + 30
        while any(n not in s for s in seen) and time.monotonic() < deadline:
            time.sleep(0.001)
        out.append(max(s.get(n, float("inf")) for s in seen) - started)
    stop.set()
    for thread in threads:
        thread.join(5)
    producer.close()
    return out
