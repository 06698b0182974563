from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from dynft.cli import main
from dynft.registry import AdapterRegistry
from dynft.settings import Settings

from helpers import free_port, keyword_events, write_jsonl


def test_config_prints_the_effective_configuration_with_secrets_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYNFT_SERVER__ADMIN_TOKEN", "s3cret")
    result = CliRunner().invoke(main, ["config", "--port", "9100", "--set", "trainer.lr=0.002", "--source", "file:x"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["server"]["port"] == 9100 and data["trainer"]["lr"] == 0.002 and data["source"]["uri"] == "file:x"
    assert data["server"]["admin_token"] == "**********" and "s3cret" not in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--set", "buffer.max_events=0"],
            "config error: buffer.max_events: Input should be greater than or equal to 1",
        ),
        (["--port", "70000"], "config error: server.port: Input should be less than or equal to 65535 (got 70000)"),
        (["--set", "nonsense"], "dynft: --set 'nonsense': expected SECTION.FIELD=VALUE"),
    ],
)
def test_invalid_configuration_fails_fast_with_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["config", *args])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [message] or result.output.strip().startswith(message)
    assert len(result.output.strip().splitlines()) == 1


def test_a_dynft_variable_that_names_no_setting_is_warned_about_once() -> None:
    """pydantic-settings ignores ``DYNFT_SEVER__PORT`` silently: the port stayed 8000 unnoticed."""
    result = CliRunner().invoke(main, ["config"], env={"DYNFT_SEVER__PORT": "9100", "DYNFT_CONFIG": ""})
    assert result.exit_code == 0
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: DYNFT_SEVER__PORT names no setting and is ignored (did you mean DYNFT_SERVER__...?)"]


def test_run_refuses_a_bad_source_before_starting_anything(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["run", "--source", "kafka-ish://x", "--state-dir", str(tmp_path)])
    assert result.exit_code == 2 and "unknown source" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--metrics-port", "99999"], "'--metrics-port': 99999 is not in the range 0<=x<=65535"),
        (["produce", "x.jsonl", "--topic", "t", "--bootstrap", "garbage"], "--bootstrap: 'garbage' is not HOST:PORT"),
        (["produce", "x.jsonl", "--topic", "t", "--rate", "nan"], "'--rate': nan is not a finite number"),
        (["produce", "x.jsonl", "--topic", "t", "--rate", "-1"], "'--rate': -1.0 is not in the range x>=0"),
        (["produce", "x.jsonl", "--topic", "t", "--partitions", "0"], "'--partitions': 0 is not in the range x>=1"),
        (["produce", "missing.jsonl", "--topic", "t", "--bootstrap", "127.0.0.1:9"], "missing.jsonl: cannot read"),
        (["kafka", "up", "--port", "99999"], "'--port': 99999 is not in the range 0<=x<=65535"),
        (["run", "--source", "kafka://127.0.0.1:99999/t"], "'127.0.0.1:99999' is not HOST:PORT (a port of 1-65535)"),
        (["run", "--source", "kafka://127.0.0.1:9092/bad%20topic"], "topic 'bad%20topic' is not a Kafka topic name"),
        (["run", "--source", "kafka://127.0.0.1:9092/t?group="], "give one group of 1-255 characters"),
        (["run", "--source", "kafka://127.0.0.1:9092/t?group=a&group=b"], "give one group of 1-255 characters"),
    ],
    ids=[
        "metrics-port",
        "bootstrap",
        "rate-nan",
        "rate-negative",
        "partitions",
        "missing-file-before-the-broker",
        "broker-port",
        "source-port",
        "topic-name",
        "empty-group",
        "two-groups",
    ],
)
def test_bad_command_line_values_are_refused_before_anything_starts(
    tmp_path: Path, args: list[str], message: str
) -> None:
    """Found by a review: a traceback (``--bootstrap garbage``, ``--metrics-port 99999``), a broker
    started on port 99999, a daemon waiting for ever for a broker at port 99999, a rate of NaN."""
    result = CliRunner().invoke(main, args, env={"DYNFT_STATE_DIR": str(tmp_path / "state")})
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "state").exists()


def test_a_metrics_port_in_use_is_a_configuration_error_of_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "dynft", "train", "--metrics-port", str(port), "--state-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"dynft: --metrics-port: cannot listen on 127.0.0.1:{port} " + (
        "(Address already in use)"
    )


def test_a_task_with_no_registry_is_a_usage_error_and_a_stray_folder_is_no_task(tmp_path: Path) -> None:
    """Found by a probe: `adapters list --task ''` exited 1 (a runtime failure), and any folder
    under registry/tasks/ was listed as a task (and waited for by the server for ever)."""
    from dynft.tasks import known_tasks

    AdapterRegistry(tmp_path / "registry")
    AdapterRegistry(tmp_path / "registry" / "tasks" / "intents")
    (tmp_path / "registry" / "tasks" / "ghost").mkdir()
    assert known_tasks(tmp_path / "registry") == ["default", "intents"]
    for task in ("", "ghost", "../.."):
        result = CliRunner().invoke(main, ["adapters", "list", "--state-dir", str(tmp_path), "--task", task])
        assert result.exit_code == 2 and "has no versions in" in result.output, (task, result.output)
        assert "known tasks: default, intents" in result.output
    result = CliRunner().invoke(main, ["adapters", "list", "--state-dir", str(tmp_path), "--task", "intents"])
    assert result.exit_code == 0 and "no versions in" in result.output  # said, not an empty exit 0


def test_adapters_commands_work_on_the_registry(tmp_path: Path) -> None:
    import torch

    from dynft.model import AdapterState

    registry = AdapterRegistry(tmp_path / "registry")
    for i in range(3):
        registry.publish(AdapterState({"w": torch.full((2,), float(i))}, ["a"], {"peft_type": "LORA"}), {"step": i})
    registry.promote(1, "first")
    registry.promote(3, "gate")
    runner = CliRunner()
    base = ["--state-dir", str(tmp_path)]
    listed = runner.invoke(main, ["adapters", "list", *base]).output.splitlines()
    assert [line[:4] for line in listed] == ["  v1", "  v2", "* v3"]
    assert json.loads(runner.invoke(main, ["adapters", "show", "2", *base]).output)["step"] == 1
    assert runner.invoke(main, ["adapters", "rollback", *base]).output.strip() == "serving v1 (pinned)"
    assert runner.invoke(main, ["adapters", "promote", "2", *base]).output.strip() == "serving v2 (pinned)"
    assert registry.serving().version == 2 and registry.serving().pinned
    assert runner.invoke(main, ["adapters", "unpin", *base]).exit_code == 0
    assert not registry.serving().pinned
    missing = runner.invoke(main, ["adapters", "promote", "9", *base])
    assert missing.exit_code == 2 and "adapter version 9 does not exist" in missing.output
    # Found by a probe: the CLI rewrote serving.json 0644 (the daemon writes it 0600); one damaged
    # meta.json, or one with fields of another type, failed the whole list (with a traceback); a
    # stray file in versions/ counted as a version.
    assert registry.pointer_path.stat().st_mode & 0o777 == 0o600
    (registry.path(2) / "meta.json").write_bytes(b"\xff garbage")
    meta = json.loads((registry.path(1) / "meta.json").read_text())
    (registry.path(1) / "meta.json").write_text(json.dumps(meta | {"step": [1], "gate": [1], "metrics": 2}))
    (registry.versions_dir / "000099").write_text("stray")
    listed = runner.invoke(main, ["adapters", "list", *base])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert [line[:4] for line in lines] == ["  v1", "* v2", "  v3"] and "step [1]" in lines[0]  # v2 serves
    assert lines[1].startswith("* v2     unreadable: adapter version 2: unreadable meta.json")


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return -1.0


def test_adapters_commands_on_a_mistyped_state_directory_create_nothing(tmp_path: Path) -> None:
    typo = tmp_path / "stat"
    for args in (["list"], ["show", "1"], ["rollback"]):
        result = CliRunner().invoke(main, ["adapters", *args, "--state-dir", str(typo)])
        assert result.exit_code == 2, result.output
        assert f"no registry at {typo / 'registry'}" in result.output
    assert not typo.exists()


@pytest.mark.slow
def test_dynft_run_trains_serves_swaps_and_stops_cleanly(tiny_settings: Settings, tmp_path: Path) -> None:
    """The whole daemon as users run it: two child processes, one metrics endpoint, SIGTERM exits 0."""
    stream = write_jsonl(tmp_path / "stream.jsonl", keyword_events(3000, ["alpha", "beta", "gamma"], seed=11))
    port = free_port()
    config = tmp_path / "dynft.toml"
    config.write_text(
        "[trainer]\nlr = 0.01\nhead_lr = 0.03\nwarmup_steps = 5\n"
        "[registry]\npublish_every_steps = 25\npublish_interval_s = 3\n"
        "[source]\nfollow = true\n"  # a live file: the trainer keeps waiting for more
    )
    cmd = [
        sys.executable,
        "-m",
        "dynft",
        "run",
        "--config",
        str(config),
        "--model",
        str(tiny_settings.model.path),
        "--source",
        f"file:{stream}",
        "--state-dir",
        str(tmp_path / "state"),
        "--port",
        str(port),
    ]
    log = open(tmp_path / "run.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "DYNFT_SERVER__PORT": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        swaps = 0.0
        with httpx.Client(base_url=base, timeout=10) as client:
            while time.monotonic() < deadline:
                assert proc.poll() is None, (tmp_path / "run.log").read_text()
                try:
                    swaps = metric(client.get("/metrics").text, "dynft_swaps_total")
                except httpx.HTTPError:
                    swaps = 0
                if swaps >= 2:
                    break
                time.sleep(0.5)
            assert swaps >= 2, (tmp_path / "run.log").read_text()[-3000:]
            answer = client.post("/v1/predict", json={"texts": ["w3 beta2 w5"]}).json()
            assert answer["predictions"][0]["label"] in ("alpha", "beta", "gamma")
            text = client.get("/metrics").text
            # Trainer and server metrics come out of the same endpoint.
            assert metric(text, 'dynft_events_total{outcome="trained"}') > 100
            assert metric(text, "dynft_train_steps_total") > 10
            assert 0 < metric(text, "dynft_prequential_accuracy") <= 1
            assert metric(text, 'dynft_adapter_versions_total{decision="promoted"}') >= 2
            # The answer's version, or a newer one swapped in between the two requests.
            assert metric(text, "dynft_serving_version") >= answer["adapter_version"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)  # reaped here, not by a later test's garbage collection (a ResourceWarning there)
        log.close()
    output = (tmp_path / "run.log").read_text()
    assert "received SIGTERM; finishing the step and publishing" in output
    assert "dynft stopped" in output
    assert "| steps" in output and "acc" in output  # the status line


@pytest.mark.slow
def test_dynft_train_alone_exposes_its_metrics_and_stops_on_sigterm(tiny_settings: Settings, tmp_path: Path) -> None:
    stream = write_jsonl(tmp_path / "stream.jsonl", keyword_events(400, ["alpha", "beta"], seed=12))
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "dynft",
        "train",
        "--model",
        str(tiny_settings.model.path),
        "--source",
        f"file:{stream}",
        "--state-dir",
        str(tmp_path / "state"),
        "--metrics-port",
        str(port),
        "--set",
        "source.follow=true",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, trained = time.monotonic() + 90, -1.0
        while time.monotonic() < deadline and trained < 300:
            time.sleep(0.5)
            try:
                trained = metric(
                    httpx.get(f"http://127.0.0.1:{port}/metrics").text, 'dynft_events_total{outcome="trained"}'
                )
            except httpx.HTTPError:
                continue
        assert trained >= 300
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert AdapterRegistry(tmp_path / "state" / "registry").versions(), "publishes at shutdown"


def test_a_reader_that_stops_early_gets_no_error_message(tmp_path: Path) -> None:
    """`dynft ledger ... | head -1`: the closed pipe is the reader's choice, not a failure to report."""
    from dynft.ledger import Ledger

    book = Ledger(tmp_path / "ledger.db")
    ids = [f"event-{i:06d}" for i in range(5000)]  # far more output than a pipe holds
    book.record((event_id, "trained") for event_id in ids)
    book.commit()
    book.close()
    (tmp_path / "ids.jsonl").write_text("".join(f'{{"id": "{i}"}}\n' for i in ids))
    command = [sys.executable, "-m", "dynft", "ledger", "--state-dir", str(tmp_path)]
    command += ["--from-file", str(tmp_path / "ids.jsonl")]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        proc.stdout.close()  # as `head -1` does
        err = proc.stderr.read().decode()
        proc.wait(60)
    assert json.loads(first)["status"] == "trained"
    assert err == ""


def test_ledger_from_file_looks_up_every_line_with_an_id_and_names_the_others(tmp_path: Path) -> None:
    """A file fed to the daemon may hold records it dead-lettered: a line without a usable id is
    named on stderr and skipped (it stopped the lookup before), and a rejected record with one is
    looked up as the daemon keyed it."""
    from dynft.ledger import Ledger

    book = Ledger(tmp_path / "ledger.db")
    book.record([("a", "trained"), ("b", "dead_lettered")])
    book.commit()
    book.close()
    lines = [
        '\ufeff{"id": "a", "text": "t", "label": "x"}',  # a byte order mark, as the file source allows
        "not json at all",
        '{"id": "b", "text": "", "label": "x"}',  # rejected (empty text), keyed by its id
        '{"text": "no id", "label": "x"}',
        '{"id": "c", "text": "t", "label": "x"}',  # never seen
    ]
    (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    command = [sys.executable, "-m", "dynft", "ledger", "--state-dir", str(tmp_path)]
    done = subprocess.run([*command, "--from-file", str(tmp_path / "events.jsonl")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = {r["id"]: r["status"] for r in map(json.loads, done.stdout.splitlines())}
    assert rows == {"a": "trained", "b": "dead_lettered", "c": "unseen"}
    named = [line.split(": ")[0] for line in done.stderr.splitlines() if "no usable id" in line]
    assert named == [f"{tmp_path / 'events.jsonl'}:2", f"{tmp_path / 'events.jsonl'}:4"], done.stderr
    (tmp_path / "bad.jsonl").write_text("nothing\n")
    done = subprocess.run([*command, "--from-file", str(tmp_path / "bad.jsonl")], capture_output=True, text=True)
    assert done.returncode == 2 and "no line has a usable id" in done.stderr


def test_ledger_names_a_file_that_is_no_dynft_ledger_and_leaves_it_as_it_was(tmp_path: Path) -> None:
    """An empty ``ledger.db`` was given the trainer's schema by the reading command, and one with
    another schema failed with sqlite's "no such column" and exit 1."""
    import sqlite3

    path = tmp_path / "ledger.db"
    command = [sys.executable, "-m", "dynft", "ledger", "--state-dir", str(tmp_path)]
    path.write_bytes(b"")
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2 and "not a dynft ledger (no events table" in done.stderr, done.stderr
    assert path.read_bytes() == b"", "a reader writes nothing"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE events (id TEXT, what TEXT)")
    db.commit()
    db.close()
    done = subprocess.run([*command, "some-id"], capture_output=True, text=True)
    assert done.returncode == 2 and "an events table with columns id, what" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_kafka_pythons_own_logs_show_only_at_debug() -> None:
    """A review counted some 130 kafka-python ERROR/WARNING lines (and tracebacks) in a 30 s outage
    that dynft reports once itself; its child consumer process re-emitted kafka-python's INFO too."""
    import logging

    from dynft.sources.kafka_connect import quiet_kafka_logs

    kafka_log = logging.getLogger("kafka")
    before = kafka_log.level
    try:
        quiet_kafka_logs(logging.INFO)
        assert not logging.getLogger("kafka.net.connection").isEnabledFor(logging.ERROR)
        quiet_kafka_logs(logging.DEBUG)
        assert logging.getLogger("kafka.net.connection").isEnabledFor(logging.DEBUG)
    finally:
        kafka_log.setLevel(before)
