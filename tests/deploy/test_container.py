"""deploy/Dockerfile and deploy/compose*.yaml: schema-valid, consistent with each other and with dynft's settings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dynft.events import Event, decode
from dynft.settings import EventSettings, KafkaSettings
from dynft.sources.kafka import parse_kafka_uri

from deploy.conftest import (
    DEPLOY,
    REPO,
    Daemon,
    dockerfile,
    final_stage,
    image_env,
    settings_from_env,
)
from helpers import free_port

COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_GPU = DEPLOY / "compose.gpu.yaml"


def compose(path: Path = COMPOSE) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def check_jsonschema(*args: str) -> subprocess.CompletedProcess[str]:
    """check-jsonschema (PyPI) with its bundled copy of the Compose specification's schema: works offline."""
    cmd = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Short-syntax volumes of a service: source -> target."""
    return {v.split(":")[0]: v.split(":")[1] for v in service.get("volumes", [])}


# -- Dockerfile --------------------------------------------------------------------------------


def test_dockerfile_builds_a_cpu_or_a_cuda_variant() -> None:
    instructions = dockerfile()
    first_from = next(i for i, ins in enumerate(instructions) if ins.keyword == "FROM")
    global_args = {ins.args.split("=")[0]: ins.args.partition("=")[2] for ins in instructions[:first_from]}
    assert global_args["VARIANT"] == "cpu"
    stages = [ins.args for ins in instructions if ins.keyword == "FROM"]
    names = {s.split(" AS ")[1] for s in stages if " AS " in s}
    assert {"build", "runtime-cpu", "runtime-cuda"} <= names
    assert stages[-1] == "runtime-${VARIANT}", "the final stage is the one VARIANT names"
    cuda = instructions[[ins.args for ins in instructions].index("runtime-cpu AS runtime-cuda") + 1]
    assert cuda.keyword == "ENV" and "NVIDIA_VISIBLE_DEVICES=all" in cuda.args


@pytest.mark.parametrize(
    "variant,expected",
    [("cpu", "pip install --index-url https://download.pytorch.org/whl/cpu torch"), ("cuda", "pip install torch")],
)
def test_the_variant_picks_the_torch_wheels(variant: str, expected: str, tmp_path: Path) -> None:
    """The build stage's torch step, run by a real shell with a stand-in pip."""
    instructions = dockerfile()
    step = next(ins.args for ins in instructions if ins.keyword == "RUN" and '"$VARIANT"' in ins.args)
    index = next(ins.args for ins in instructions if ins.args.startswith("TORCH_CPU_INDEX="))
    script = f'pip() {{ echo "pip $*"; }}\n{step}'
    env = {"PATH": os.environ["PATH"], "VARIANT": variant, "TORCH_CPU_INDEX": index.partition("=")[2]}
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == expected, done
    env["VARIANT"] = "rocm"
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode != 0 and "VARIANT must be cpu or cuda, got 'rocm'" in done.stderr


def test_image_runs_dynft_as_non_root_on_a_state_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    stage = final_stage(dockerfile())
    last = {ins.keyword: ins.args for ins in stage}  # the instruction in force for each keyword
    user = last["USER"].split(":")
    assert user[0].isdigit() and int(user[0]) != 0, "a numeric non-root uid, so runAsNonRoot can verify it"
    assert f"--uid {user[0]}" in next(ins.args for ins in stage if "useradd" in ins.args)
    assert json.loads(last["ENTRYPOINT"]) == ["dynft", "run"]
    env = image_env(stage)
    settings = settings_from_env(env, monkeypatch)
    assert json.loads(last["VOLUME"]) == [str(settings.state_dir)] == [env["HOME"]]
    assert settings.server.host == "0.0.0.0" and last["EXPOSE"] == str(settings.server.port)
    assert env["HF_HUB_OFFLINE"] == "1"
    assert "/healthz" in last["HEALTHCHECK"] and last["STOPSIGNAL"] == "SIGTERM"


def test_the_build_context_holds_what_the_dockerfile_copies() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for ins in dockerfile():
        if ins.keyword == "COPY" and not ins.args.startswith("--from"):
            for source in ins.args.split()[:-1]:
                assert (REPO / source).exists(), source
                assert f"!{source}" in ignore or f"!{source}/" in ignore, f"{source} is excluded from the context"


@pytest.mark.slow
def test_healthcheck_command_probes_the_server(live_dynft: Daemon) -> None:
    """The HEALTHCHECK's own command line, run against the live daemon and against a closed port."""
    health = next(ins.args for ins in final_stage(dockerfile()) if ins.keyword == "HEALTHCHECK")
    probe = health.split(" CMD ", 1)[1]
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # `python` is the venv's, as in the image
    for port, healthy in ((live_dynft.port, True), (free_port(), False)):
        env = {"PATH": path, "DYNFT_SERVER__PORT": str(port)}
        done = subprocess.run(["sh", "-c", probe], capture_output=True, text=True, env=env, timeout=30)
        assert (done.returncode == 0) is healthy, (port, done)


# -- Compose -------------------------------------------------------------------------------------


def test_compose_files_follow_the_compose_specification(tmp_path: Path) -> None:
    done = check_jsonschema(str(COMPOSE), str(COMPOSE_GPU))
    assert done.returncode == 0, done.stdout + done.stderr
    broken = compose()
    broken["services"]["dynft"]["enviroment"] = broken["services"]["dynft"].pop("environment")
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    done = check_jsonschema(str(tmp_path / "broken.yaml"))
    assert done.returncode != 0 and "enviroment" in done.stdout + done.stderr


def docker_compose_unusable() -> str | None:
    if shutil.which("docker") is None:
        return "no docker client on this machine"
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        return f"`docker compose` is not usable here ({(probe.stderr or probe.stdout).strip().splitlines()[0]})"
    return None


def test_docker_compose_config_accepts_the_files() -> None:
    reason = docker_compose_unusable()
    if reason is not None:
        pytest.skip(f"{reason}; the files are checked against the Compose specification's schema instead")
    cmd = ["docker", "compose", "-f", str(COMPOSE), "-f", str(COMPOSE_GPU), "config", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_compose_wires_kafka_dynft_prometheus_and_grafana(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose()["services"]
    assert {"kafka", "kafka-init", "dynft", "prometheus", "grafana"} <= set(services)
    kafka, init, dynft = services["kafka"], services["kafka-init"], services["dynft"]
    assert kafka["image"].startswith("apache/kafka:") and init["image"] == kafka["image"]
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller", "KRaft, no ZooKeeper"
    settings = settings_from_env({**image_env(dockerfile()), **dynft["environment"]}, monkeypatch)
    servers, topics, group = parse_kafka_uri(settings.source.uri, settings.kafka.group)
    assert servers == ["kafka:9092"] and group == "dynft"
    assert "PLAINTEXT://kafka:9092" in kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    created = " ".join(init["command"])
    for topic in topics:  # the event topic and its dead-letter topic exist before dynft starts
        assert f"--topic {topic} " in created and f"--topic {topic}{KafkaSettings().dlq_suffix} " in created
    assert dynft["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    build = dynft["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert (DEPLOY / build["context"] / "pyproject.toml").exists()
    assert set(mounts(dynft).values()) == {str(settings.state_dir)}
    assert [p.rsplit(":", 1)[1] for p in dynft["ports"]] == [str(settings.server.port)]
    # Prometheus reads the shipped folder and scrapes dynft where Compose runs it.
    prometheus = services["prometheus"]
    assert mounts(prometheus)["./prometheus"] == "/etc/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    job = next(job for job in scrape if job["job_name"] == "dynft")
    assert job["static_configs"][0]["targets"] == [f"dynft:{settings.server.port}"]
    for service in services.values():
        for source in mounts(service):
            assert not source.startswith(".") or (DEPLOY / source).exists(), source


def test_compose_gpu_override_runs_the_cuda_image(monkeypatch: pytest.MonkeyPatch) -> None:
    dynft = compose(COMPOSE_GPU)["services"]["dynft"]
    assert dynft["build"]["args"]["VARIANT"] == "cuda"
    assert settings_from_env(dynft["environment"], monkeypatch).model.device == "cuda"
    devices = dynft["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_demo_events_script_prints_events_dynft_accepts() -> None:
    """The quick start's producer input: every line a valid event, ids unique across repeats."""
    cmd = [sys.executable, str(DEPLOY / "demo-events.py"), "--repeat", "2"]
    lines = subprocess.run(cmd, capture_output=True, check=True, timeout=60).stdout.splitlines()
    demo = (REPO / "dynft" / "data" / "demo" / "banking77-12.jsonl").read_text().splitlines()
    assert len(lines) == 2 * len([line for line in demo if line.strip()])
    events = [decode(line, EventSettings()) for line in lines]
    assert all(isinstance(e, Event) for e in events), next(e for e in events if not isinstance(e, Event))
    assert len({e.id for e in events if isinstance(e, Event)}) == len(lines)
