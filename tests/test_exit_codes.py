"""Failures sorted by consequence: the exit-code table, the supervisor's restart policy, masking.

The children in the supervisor test are real ``dynft`` commands forked by the supervisor's own
machinery, failing for real reasons (a ledger path that is a directory: a runtime failure,
exit 1; a state directory without a ledger: a usage error, exit 2).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from test_checkpoint import damage_pages

from dynft import errors
from dynft.errors import exit_code
from dynft.ledger import Ledger
from dynft.metrics import SupervisorMetrics
from dynft.settings import Settings, load_settings
from dynft.statedir import wait_for_state_dir
from dynft.supervisor import Child, Supervisor

from helpers import keyword_events, write_jsonl
from test_state_faults import fill, mounted


@pytest.mark.parametrize(
    "exc,code",
    [
        (errors.ConfigError("x"), 2),
        (errors.InvalidSettingsError("x"), 2),
        (errors.StateDirLockedError("x", 1), 2),
        (errors.UnsafeStateFileError("x"), 2),
        (errors.SourceError("x"), 2),
        (errors.ModelError("x"), 2),
        (errors.DynftError("x"), 1),
        (errors.RegistryError("x"), 1),
        (errors.RegistryWriteError("x"), 1),
        (errors.VersionNotFoundError(3), 2),
        (OSError(28, "No space left on device"), 1),
        (RuntimeError("x"), 1),
    ],
)
def test_the_exit_code_follows_the_error_type(exc: BaseException, code: int) -> None:
    assert exit_code(exc) == code


def test_a_config_error_is_exit_2_whatever_its_message_says() -> None:
    """The old CLI matched "config error" at the start of the message; the type decides now."""
    from click.testing import CliRunner

    from dynft.cli import main

    result = CliRunner().invoke(main, ["config", "--set", "buffer.max_events=0", "--set", "trainer.lr=-1"])
    assert result.exit_code == 2
    assert [line.split(":")[1].strip() for line in result.output.strip().splitlines()] == [
        "buffer.max_events",
        "trainer.lr",
    ]


def wait_for(supervisor: Supervisor, child: Child, done: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{child.name}: still waiting (restarts {child.restarts})"
        supervisor._check(child)  # the supervisor's main loop, one child at a time
        time.sleep(0.02)


def test_the_supervisor_restarts_exit_1_with_backoff_and_stops_on_exit_2(tmp_path: Path) -> None:
    settings = load_settings(
        overrides={"state_dir": str(tmp_path / "sup"), "run.restart_backoff_s": 0.05, "run.restart_backoff_max_s": 0.2}
    )
    supervisor = Supervisor(settings)
    supervisor.metrics = SupervisorMetrics(registry := CollectorRegistry())
    flaky_dir = tmp_path / "flaky"
    flaky_dir.mkdir()
    ledger = Ledger(flaky_dir / "ledger.db")
    ledger.record([(f"event-{i}-" + "x" * 200, "trained") for i in range(2000)])
    ledger.commit()
    ledger.close()
    damage_pages(flaky_dir / "ledger.db")  # a reader's query fails on them: exit 1, every time
    flaky = Child("trainer", ["ledger", "--state-dir", str(flaky_dir)])
    misconfigured = Child("server", ["ledger", "--state-dir", str(tmp_path / "no-ledger-here")])
    supervisor.children = [flaky]
    try:
        supervisor._spawn(flaky)
        backoffs = []
        for n in (1, 2, 3, 4):
            wait_for(supervisor, flaky, lambda n=n: flaky.restarts == n)
            backoffs.append(flaky.backoff_s)
        assert backoffs == [0.05, 0.1, 0.2, 0.2]  # doubling up to run.restart_backoff_max_s
        assert registry.get_sample_value("dynft_process_restarts_total", {"process": "trainer"}) == 4
        assert not supervisor.should_exit.is_set() and supervisor.exit_code == 0

        supervisor.children.append(misconfigured)
        supervisor._spawn(misconfigured)
        wait_for(supervisor, misconfigured, supervisor.should_exit.is_set)
        assert supervisor.exit_code == errors.EXIT_CONFIG and misconfigured.restarts == 0
    finally:
        supervisor.shutdown()


@pytest.mark.slow
def test_dynft_run_stops_with_exit_2_when_a_child_meets_a_configuration_error(
    tiny_settings: Settings, tmp_path: Path
) -> None:
    """A model directory with a config.json but no tokenizer passes the supervisor's preflight;
    the children fail to load it (a ModelError, exit 2) and ``dynft run`` stops with exit 2
    instead of restarting them forever."""
    broken = tmp_path / "model"
    broken.mkdir()
    shutil.copy(Path(str(tiny_settings.model.path)) / "config.json", broken / "config.json")
    stream = write_jsonl(tmp_path / "in.jsonl", keyword_events(20, ["alpha", "beta"]))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "dynft",
            "run",
            "--model",
            str(broken),
            "--source",
            f"file:{stream}",
            "--state-dir",
            str(tmp_path / "state"),
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 2, run.stderr[-3000:]
    assert "exited with a configuration error; stopping" in run.stderr
    assert f"dynft: model directory {broken}: no tokenizer files" in run.stderr, run.stderr[-3000:]
    assert "restarting in" not in run.stderr, "a configuration error is never retried"


@pytest.mark.slow
@pytest.mark.parametrize("where", ["a port in use", "a host that is not this machine's"])
def test_dynft_run_stops_with_exit_2_when_the_server_cannot_listen(
    where: str, tiny_settings: Settings, tmp_path: Path
) -> None:
    """uvicorn exits with 3 when it cannot bind, which read as a crash: the server was restarted
    forever while the trainer trained and another process answered on the port."""
    import socket

    stream = write_jsonl(tmp_path / "in.jsonl", keyword_events(20, ["alpha", "beta"]))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        host, port = ("127.0.0.1", taken.getsockname()[1]) if where == "a port in use" else ("192.0.2.1", 8000)
        run = subprocess.run(
            [
                *(sys.executable, "-m", "dynft", "run", "--model", str(tiny_settings.model.path)),
                *("--source", f"file:{stream}", "--state-dir", str(tmp_path / "state")),
                *("--host", host, "--port", str(port)),
            ],
            capture_output=True,
            text=True,
            timeout=240,
        )
    assert run.returncode == 2, run.stderr[-3000:]
    assert f"cannot listen on {host}:{port}" in run.stderr, run.stderr[-3000:]
    assert "restarting in" not in run.stderr


def test_secrets_are_masked_in_configuration_errors_of_the_real_cli(tmp_path: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "dynft",
            "run",
            "--state-dir",
            str(tmp_path),
            "--set",
            "server.admin_token=123456",
            "--set",
            'kafka.sasl_password=["hunter2"]',
            "--set",
            "kafka.sasl_pasword=letmein",  # a misspelt secret is an unknown field: masked all the same
            "--set",
            "server.port=70000",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert sorted(lines) == [
        "config error: kafka.sasl_password: Input should be a valid string (got ***)",
        "config error: kafka.sasl_pasword: Extra inputs are not permitted (got ***)",
        "config error: server.admin_token: Input should be a valid string (got ***)",
        "config error: server.port: Input should be less than or equal to 65535 (got 70000)",
    ]
    for secret in ("123456", "hunter2", "letmein"):
        assert secret not in run.stderr + run.stdout


def test_dynft_run_waits_out_a_full_state_disk_instead_of_stopping(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The startup check of ``dynft run`` on a disk filled for real (a 1 MiB tmpfs, skipped where
    mounting is refused): it retries with backoff, and returns once space is freed."""
    caplog.set_level(logging.WARNING)
    with mounted(tmp_path / "full", "-t", "tmpfs", "-o", "size=1m", "tmpfs") as full:
        filler = fill(full)
        waiting = threading.Thread(target=wait_for_state_dir, args=(full / "state", 0.05, 0.2))
        waiting.start()
        try:
            deadline = time.monotonic() + 30
            while sum("No space left on device" in r.getMessage() for r in caplog.records) < 3:
                assert waiting.is_alive() and time.monotonic() < deadline, "it stopped instead of retrying"
                time.sleep(0.05)
        finally:
            filler.unlink()
        waiting.join(30)
        assert not waiting.is_alive(), "it did not notice the freed space"
    retries = [r.getMessage() for r in caplog.records if "No space left on device" in r.getMessage()]
    assert all(
        m.endswith(("(trying again in 0.1 s)", "(trying again in 0.2 s)", "(trying again in 0.05 s)")) for m in retries
    ), retries
