"""Metrics as `dynft run` exposes them: the trainer and the server write through prometheus_client's
multiprocess mode, where a value is keyed by its metric name and labels alone (whatever registry
the object that writes it was created in) and a gauge never written has no sample."""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_faults import dynft, wait_ready
from test_tasks import TASKS, interleaved

from dynft.registry import AdapterRegistry
from dynft.settings import Settings
from dynft.tasks import task_registry_dir

from helpers import free_port, write_jsonl
from kafka_helpers import reap

pytestmark = pytest.mark.slow


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def disagreement(text: str, state: Path, events: int) -> str:
    """What in the exposition ``text`` disagrees with the registries under ``state``, if anything."""
    got = samples(text)
    taken = sum(v for (metric, _), v in got.items() if metric == "dynft_events_total")
    if taken < events:
        return f"{taken} of {events} events taken"
    newest = {}  # versions are numbered 1, 2, ... per task: one per publish
    for name in TASKS:
        newest[name] = max(AdapterRegistry(task_registry_dir(state / "registry", name)).versions())
    if len(set(newest.values())) == 1:
        return f"every task has {newest}: a mix-up could not show"
    per_task = {name: 0.0 for name in TASKS}
    for (metric, labels), v in got.items():
        if metric == "dynft_task_adapter_versions_total":
            per_task[dict(labels)["task"]] += v
    default = sum(v for (metric, _), v in got.items() if metric == "dynft_adapter_versions_total")
    seen = {"latest": got.get(("dynft_latest_version", ())), "counted": default, "per task": per_task}
    want = {"latest": newest["default"], "counted": newest["default"], "per task": newest}
    return "" if seen == want else f"metrics {seen}, registries {want}"


def test_named_tasks_leave_the_default_tasks_unlabelled_series_alone(tiny_settings: Settings, tmp_path: Path) -> None:
    """A probe found each named task's publisher writing ``dynft_latest_version``,
    ``dynft_adapter_versions_total`` and ``dynft_gate_accuracy`` from objects of its own: under
    `dynft run` the newest write won, so the default task's newest version read as another task's
    and the versions counter went down between scrapes. Those series describe the default task
    (README); each task's publishes are counted in ``dynft_task_adapter_versions_total``."""
    stream = write_jsonl(tmp_path / "tasks.jsonl", interleaved(150, TASKS))
    state, log, port = tmp_path / "state", tmp_path / "run.log", free_port()
    args = ["run", "--model", str(tiny_settings.model.path), "--state-dir", str(state), "--port", str(port)]
    args += ["--source", f"file:{stream}", "--set", "source.follow=true", "--set", "registry.keep_last=100"]
    args += ["--set", "registry.publish_every_steps=4", "--set", "trainer.batch_size=8"]
    proc = dynft(*args, log=log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, log)
        # Read while the trainer lives (its gauges leave the exposition with it), once it has taken
        # every event and its metrics agree with the registries on disk (a publish may fall between).
        deadline, problem = time.monotonic() + 300, "not started"
        while problem:
            assert time.monotonic() < deadline and proc.poll() is None, (problem, log.read_text()[-3000:])
            time.sleep(1)
            problem = disagreement(httpx.get(f"{base}/metrics", timeout=10).text, state, 3 * 150)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0
    finally:
        reap(proc)


def test_the_serving_gauges_are_0_while_nothing_serves(tiny_settings: Settings, tmp_path: Path) -> None:
    """README: ``dynft_serving_version`` is 0 while nothing serves. Under `dynft run` a gauge that
    was never written had no sample at all (a probe), so an alert on it could never fire."""
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    log, port = tmp_path / "run.log", free_port()
    args = ["run", "--model", str(tiny_settings.model.path), "--state-dir", str(tmp_path / "state")]
    args += ["--port", str(port), "--source", f"file:{empty}", "--set", "source.follow=true"]
    proc = dynft(*args, log=log)
    try:
        deadline, got = time.monotonic() + 120, {}
        while "dynft_serving_version" not in {name for name, _ in got}:
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
            with contextlib.suppress(httpx.HTTPError):
                got = samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
        assert got["dynft_serving_version", ()] == 0
        assert got["dynft_serving_fallback", ()] == 0
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 503
        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0
    finally:
        reap(proc)
