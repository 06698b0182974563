"""The deployment tests' real things: `dynft run` on Kafka, and Debian's Prometheus scraping it.

Both are session-scoped (tens of seconds to start) and shared by the modules of tests/deploy.
Prometheus and promtool come from Debian's `prometheus` package, which `make deploy-tools` (a
prerequisite of `make test`) installs; a test that needs them fails, never skips, without them.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from dynft.devbroker import Broker
from dynft.produce import ensure_topic, produce
from dynft.settings import Settings, load_settings, reference_table

from helpers import free_port, keyword_events, write_jsonl

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
LABELS = ["alpha", "beta", "gamma"]
MALFORMED = [b"{not json", b'{"id": "bad-1", "text": "", "label": "alpha"}', b'{"id": "bad-2", "text": "w1"}']
# Series Prometheus makes itself for every target; expressions may use them besides dynft's.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "ALERTS", "ALERTS_FOR_STATE"}


def tool(name: str) -> str:
    """The path of a Prometheus binary; a failure (not a skip) when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: `make deploy-tools` (part of `make test`) installs Debian's prometheus package")
    return path


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tail}")
        time.sleep(0.5)


def exported_names(exposition: str) -> set[str]:
    """Every sample name of a text exposition (``_total``, ``_bucket``, ``_count``, ``_sum`` included)."""
    return {s.name for family in text_string_to_metric_families(exposition) for s in family.samples}


def stop(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    """SIGTERM, then SIGKILL after ``timeout_s``; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@dataclass(frozen=True)
class Daemon:
    """A running `dynft run`: trainer and server, reading a Kafka topic."""

    base_url: str
    port: int
    topic: str
    partitions: int
    log: Path

    def metrics(self) -> str:
        return httpx.get(f"{self.base_url}/metrics", timeout=10).text


@dataclass(frozen=True)
class Prometheus:
    """A running Prometheus server, queried through its HTTP API."""

    url: str
    config: Path
    log: Path

    def api(self, path: str, **params: str) -> Any:
        """``data`` of an API answer; fails the test unless the status is success."""
        answer = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = answer.json()
        assert answer.status_code == 200 and body["status"] == "success", (params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"] if data["resultType"] == "vector" else [data]
        return result

    def value(self, expr: str) -> float:
        """The value of an expression that yields exactly one series."""
        result = self.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])


@pytest.fixture(scope="session")
def promtool() -> str:
    return tool("promtool")


@pytest.fixture(scope="session")
def live_dynft(
    kafka_broker: Broker, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    """`dynft run` as the Compose file runs it (a Kafka source) on the tiny model, once it has gated a candidate."""
    work = tmp_path_factory.mktemp("dynft-deploy")
    topic, partitions = f"deploy-{uuid.uuid4().hex[:8]}", 2
    ensure_topic([kafka_broker.bootstrap], topic, partitions, {})
    config = work / "dynft.toml"
    config.write_text(
        "[trainer]\nlr = 0.01\nhead_lr = 0.03\nwarmup_steps = 5\nthreads = 1\nfresh_wait_s = 0.05\n"
        "[registry]\npublish_every_steps = 20\npublish_interval_s = 2\n"
        "[kafka]\nlag_interval_s = 0.5\n[checkpoint]\ninterval_s = 1\n[run]\nstatus_interval_s = 2\n"
    )
    port = free_port()
    log = work / "dynft.log"
    cmd = [
        sys.executable,
        "-m",
        "dynft",
        "run",
        "--config",
        str(config),
        "--model",
        str(tiny_model_dir),
        "--source",
        f"kafka://{kafka_broker.bootstrap}/{topic}?group=deploy-{uuid.uuid4().hex[:8]}",
        "--state-dir",
        str(work / "state"),
        "--port",
        str(port),
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    daemon = Daemon(f"http://127.0.0.1:{port}", port, topic, partitions, log)

    def complete() -> bool:
        """Ready, and through a whole cycle: a candidate gated against a serving version, lag measured."""
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            if httpx.get(f"{daemon.base_url}/readyz", timeout=2).status_code != 200:
                return False
            names = exported_names(daemon.metrics())
        except httpx.HTTPError:
            return False
        return {"dynft_gate_accuracy", "dynft_kafka_lag"} <= names

    try:
        # Produced while the daemon imports its libraries; its new group reads from the earliest offset.
        rows: list[Any] = [*keyword_events(1500, LABELS, seed=21), *MALFORMED]
        produce(write_jsonl(work / "events.jsonl", rows), [kafka_broker.bootstrap], topic, {})
        wait_until(complete, 150, "dynft to gate a second adapter version", log)
        yield daemon
    finally:
        assert stop(proc, 90) == 0, log.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="session")
def prometheus(live_dynft: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """Debian's Prometheus on a free loopback port with temporary storage, scraping `live_dynft`.

    Its configuration is the shipped deploy/prometheus/prometheus.yml with the dynft target
    pointed at the test daemon, every interval at 1 s, and the shipped alerts.yml loaded.
    """
    binary = tool("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / "prometheus" / name) for name in config["rule_files"]]
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == "dynft"]
    assert len(jobs) == 1, "the shipped prometheus.yml has one dynft job"
    job = jobs[0]
    job["scrape_interval"] = "1s"
    job["static_configs"] = [{"targets": [f"127.0.0.1:{live_dynft.port}"]}]
    config["scrape_configs"] = [job]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = work / "prometheus.log"
    cmd = [
        binary,
        f"--config.file={work / 'prometheus.yml'}",
        f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=work)
    server = Prometheus(f"http://127.0.0.1:{port}", work / "prometheus.yml", log)

    def ready() -> bool:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            return httpx.get(f"{server.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 30, "Prometheus to be ready", log)
        yield server
    finally:
        assert stop(proc, 20) == 0, log.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="session")
def scraped(prometheus: Prometheus, live_dynft: Daemon) -> Prometheus:
    """Prometheus once it holds several scrapes of dynft, with predict traffic in between."""

    def enough() -> bool:
        with httpx.Client(base_url=live_dynft.base_url, timeout=10) as client:
            assert client.post("/v1/predict", json={"texts": ["w3 beta2 w5", "alpha1 w9"]}).status_code == 200
            assert client.post("/v1/predict", json={"texts": []}).status_code == 422
        scrapes = prometheus.query('count_over_time(up{job="dynft"}[1m])')
        predicted = prometheus.query("sum(increase(dynft_predict_seconds_count[1m])) > 0")
        return bool(scrapes) and float(scrapes[0]["value"][1]) >= 5 and bool(predicted)

    wait_until(enough, 60, "five scrapes of dynft with predictions", prometheus.log)
    return prometheus


# -- the Dockerfile, read the way Docker reads it (enough of it for these files) -----------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def dockerfile(path: Path = DEPLOY / "Dockerfile") -> list[Instruction]:
    """Instructions in order: continuation lines joined, comment lines dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines inside continuations too
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        out.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    return out


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last_from = max(i for i, ins in enumerate(instructions) if ins.keyword == "FROM")
    return instructions[last_from:]


def image_env(instructions: list[Instruction]) -> dict[str, str]:
    """The ENV of the final stage (KEY=VALUE form)."""
    env: dict[str, str] = {}
    for ins in final_stage(instructions):
        if ins.keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(ins.args))  # type: ignore[misc]
    return env


def setting_env_names() -> set[str]:
    """The environment variables dynft reads: one per setting (its reference table), and the config file's."""
    return set(re.findall(r"`(DYNFT_[A-Z0-9_]+)`", reference_table())) | {"DYNFT_CONFIG"}


def settings_from_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, config: Path | None = None) -> Settings:
    """dynft's settings as a container with ``env`` would load them; a misspelt DYNFT_ name fails."""
    ours = {k: v for k, v in env.items() if k.startswith("DYNFT_")}
    assert set(ours) <= setting_env_names(), f"not dynft settings: {sorted(set(ours) - setting_env_names())}"
    for name in [k for k in os.environ if k.startswith("DYNFT_")]:
        monkeypatch.delenv(name)
    for name, value in ours.items():
        if name != "DYNFT_CONFIG":  # the CLI reads that one; here it is the `config` argument
            monkeypatch.setenv(name, value)
    return load_settings(config)
