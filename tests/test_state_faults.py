"""A full disk or an unwritable state directory, produced for real, never a mock.

The faults are real: a state directory under a regular file (ENOTDIR, works anywhere), and,
where this process may mount (root with CAP_SYS_ADMIN, as on dynft's development machines and
CI), a 16 MiB tmpfs that the test fills to the last byte (ENOSPC), a read-only tmpfs (EROFS)
and a read-only bind mount over the registry while the trainer runs. Where mounting is refused
the tests that need it are skipped with the reason; none of them falls back to a mock.

What they prove: a checkpoint or a publish that fails on the disk is one log line naming the
path and the reason, counted in ``dynft_checkpoint_errors_total`` / ``dynft_publish_errors_total``;
the server keeps answering with the version it had, and both writes succeed at the next interval
once the disk takes them again. A full state disk also pauses intake until it takes writes again
(tests/test_disk_full.py); a read-only registry does not: the trainer trains on. At start,
a state directory that cannot be written is one line at the CLI and exit 2 (exit 1 for a full
disk, which may clear up and which ``dynft run`` therefore retries), never a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from dynft.checkpoint import Checkpoint, CheckpointError, CheckpointStore
from dynft.cli import main
from dynft.errors import RegistryWriteError
from dynft.ledger import Ledger
from dynft.loop import TrainingLoop
from dynft.model import AdapterState
from dynft.registry import AdapterRegistry
from dynft.settings import Settings

from helpers import keyword_events

LABELS = ["alpha", "beta", "gamma"]


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


@contextmanager
def mounted(target: Path, *args: str) -> Iterator[Path]:
    """``mount ARGS TARGET`` for the duration, or skip the test (with why) where mounting is refused."""
    target.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command: a real full or read-only filesystem cannot be produced here")
    done = _mount(*args, str(target))
    if done.returncode != 0:
        pytest.skip(f"mount refused ({done.stderr.strip()}): a real full or read-only filesystem cannot be produced")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem refuses another byte (ENOSPC); returns the file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1):
            try:
                while True:
                    fh.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    with pytest.raises(OSError) as full:  # proof that the disk is really full
        (directory / "probe").write_bytes(b"x" * 4096)
    assert full.value.errno == errno.ENOSPC
    return filler


def sample(metrics: CollectorRegistry, name: str) -> float:
    return metrics.get_sample_value(name) or 0.0


def processed(metrics: CollectorRegistry) -> float:
    """Events the trainer is done with, whatever the outcome."""
    outcomes = ("trained", "held_out", "skipped", "dead_lettered")
    return sum(metrics.get_sample_value("dynft_events_total", {"outcome": o}) or 0.0 for o in outcomes)


def follow_with_frequent_writes(s: Settings, stream: Path) -> None:
    """The running-trainer tests: follow ``stream``; publish and checkpoint every 15 steps; promote every version."""
    s.source.uri, s.source.follow, s.source.poll_interval_s = f"file:{stream}", True, 0.05
    s.registry.publish_every_steps, s.registry.publish_interval_s = 15, 600
    s.checkpoint.every_steps, s.checkpoint.interval_s = 15, 600
    s.gate.tolerance, s.gate.min_holdout = 1.0, 8  # every version is promoted: these tests are about the disk


def start_trainer(s: Settings, metrics: CollectorRegistry) -> tuple[TrainingLoop, threading.Thread]:
    loop = TrainingLoop(s, metrics)
    thread = threading.Thread(target=loop.run, name="trainer")
    thread.start()
    return loop, thread


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


# -- startup ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_state_dir_under_a_regular_file_is_one_line_and_exit_2(tiny_settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "plain-file").write_text("not a directory")
    stream = tmp_path / "in.jsonl"
    stream.write_text(json.dumps(keyword_events(1, LABELS)[0]) + "\n")
    model = str(tiny_settings.model.path)
    for command, state in (
        ("train", tmp_path / "plain-file" / "state"),  # ENOTDIR when creating it
        ("train", tmp_path / "plain-file"),  # exists, but is a file
    ):
        result = CliRunner().invoke(
            main, [command, "--state-dir", str(state), "--model", model, "--source", f"file:{stream}"]
        )
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"dynft: state directory {state}"), result.output
        assert "Traceback" not in result.output
    # The real command line, in its own process: one line on stderr, exit 2, nothing started.
    state = tmp_path / "plain-file" / "state"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "dynft",
            "run",
            "--state-dir",
            str(state),
            "--model",
            model,
            "--source",
            f"file:{stream}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"dynft: state directory {state}: cannot write there (Not a directory: {state})"
    ]


def test_a_read_only_or_full_state_dir_at_startup(tiny_settings: Settings, tmp_path: Path) -> None:
    stream = tmp_path / "in.jsonl"
    stream.write_text(json.dumps(keyword_events(1, LABELS)[0]) + "\n")
    args = ["--model", str(tiny_settings.model.path), "--source", f"file:{stream}"]
    with mounted(tmp_path / "ro", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs") as ro:
        result = CliRunner().invoke(main, ["train", "--state-dir", str(ro / "state"), *args])
        assert result.exit_code == 2, result.output
        assert result.output.strip() == (
            f"dynft: state directory {ro / 'state'}: cannot write there (Read-only file system: {ro / 'state'})"
        )
    with mounted(tmp_path / "full", "-t", "tmpfs", "-o", "size=1m", "tmpfs") as full:
        fill(full)
        result = CliRunner().invoke(main, ["train", "--state-dir", str(full), *args])
        assert result.exit_code == 1, result.output  # may clear up: `dynft run` retries it with backoff
        (line,) = result.output.strip().splitlines()
        assert line.startswith(f"dynft: error: state directory {full}: cannot write there (No space left on device")
        assert line.endswith("free some space and start again")
        assert not list(full.glob(".write-probe-*")), "the probe must not be left behind"


# -- while running ------------------------------------------------------------------------


def test_checkpoint_store_reports_a_real_enotdir_with_path_and_reason(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    store = CheckpointStore(tmp_path / "file" / "checkpoints")
    with pytest.raises(CheckpointError, match=r"cannot write a checkpoint in .*/file/checkpoints \(Not a directory: "):
        store.save(Checkpoint({}, {"steps": 1}))


def test_registry_writes_on_a_full_disk_are_registry_write_errors(tmp_path: Path) -> None:
    import torch

    with mounted(tmp_path / "disk", "-t", "tmpfs", "-o", "size=4m", "tmpfs") as disk:
        registry = AdapterRegistry(disk / "registry")
        state = AdapterState({"w": torch.ones(4)}, ["a", "b"], {"peft_type": "LORA"})
        registry.publish(state, {"step": 1})
        registry.promote(1, "first")
        filler = fill(disk)
        with pytest.raises(RegistryWriteError, match=r"cannot write a version \(No space left on device: "):
            registry.publish(state, {"step": 2})
        with pytest.raises(RegistryWriteError, match=r"cannot write serving\.json \(No space left on device: "):
            registry.promote(1, "again", pin=True)
        filler.unlink()
        assert registry.versions() == [1] and registry.serving().version == 1
        assert not list((disk / "registry").glob(".serving.json.*.tmp")), "half-written pointers are cleaned up"
        assert not list((disk / "registry" / ".staging").iterdir()), "half-written versions are cleaned up"


@pytest.mark.slow
def test_a_read_only_registry_costs_versions_not_checkpoints_or_serving(
    tiny_settings: Settings, tmp_path: Path
) -> None:
    """The registry is made read-only for real (a read-only bind mount over it) while the trainer
    runs: publishing fails with EROFS and is counted, checkpoints (elsewhere) go on, the serving
    version stays; made writable again after the stream went quiet, the failed publish is tried
    again and lands."""
    s = tiny_settings
    stream = tmp_path / "stream.jsonl"
    rows = keyword_events(1600, LABELS, seed=5)
    stream.write_text("".join(json.dumps(r) + "\n" for r in rows[:400]))
    follow_with_frequent_writes(s, stream)
    metrics = CollectorRegistry()
    loop, thread = start_trainer(s, metrics)
    registry = AdapterRegistry(s.registry_dir)
    try:
        wait_until(lambda: processed(metrics) == 400, "the first 400 events are processed")
        time.sleep(1.0)  # the main loop finishes the publish and checkpoint of its last step; then it idles
        assert registry.serving().version is not None
        with mounted(s.registry_dir, "--bind", str(s.registry_dir)) as target:
            if _mount("-o", "remount,ro,bind", str(target)).returncode != 0:
                pytest.skip("cannot remount the bind mount read-only here")
            serving, checkpoints = registry.serving().version, sample(metrics, "dynft_checkpoints_total")
            with open(stream, "a", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows[400:1600])
            wait_until(lambda: sample(metrics, "dynft_publish_errors_total") >= 2, "publishes fail on EROFS")
            wait_until(lambda: sample(metrics, "dynft_checkpoints_total") > checkpoints, "checkpoints go on")
            wait_until(lambda: processed(metrics) == 1600, "every event is processed")
            assert thread.is_alive() and registry.serving().version == serving
            assert registry.versions()[-1] == serving
            assert _mount("-o", "remount,rw,bind", str(target)).returncode == 0
            # No event after it: the failed publish is tried again on its own (backoff up to 60 s).
            wait_until(lambda: registry.versions()[-1] > serving, "a version once the registry is writable", 150.0)
    finally:
        loop.should_exit.set()
        thread.join(120)
    assert not thread.is_alive()
    assert sample(metrics, "dynft_checkpoint_errors_total") == 0


def test_dynft_ledger_reads_a_ledger_on_a_read_only_filesystem(tmp_path: Path) -> None:
    """Found by a probe: `dynft ledger` on a read-only copy of a state directory failed with
    "unable to open database file" (SQLite cannot make a WAL database's shared-memory file there),
    while `dynft adapters list` read the same directory."""
    with mounted(tmp_path / "state", "-t", "tmpfs", "-o", "size=4m", "tmpfs") as state:
        ledger = Ledger(state / "ledger.db")
        ledger.record([("a", "trained"), ("b", "dead_lettered")])
        ledger.commit()
        ledger.close()
        assert _mount("-o", "remount,ro", str(state)).returncode == 0
        assert not os.access(state, os.W_OK)
        command = [sys.executable, "-m", "dynft", "ledger", "--state-dir", str(state)]
        done = subprocess.run([*command, "a", "c"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        assert lines == [{"id": "a", "status": "trained", "seen": 1}, {"id": "c", "status": "unseen", "seen": 0}]
        assert "write-ahead log" not in done.stderr  # a ledger closed cleanly leaves none unread
