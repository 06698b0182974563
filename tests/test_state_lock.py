"""One daemon per state directory, private state files, no symlinks, a trusted admin token.

Everything here is real: the lock is held by a real process (a real ``dynft run`` in the
end-to-end test), the symlinks and foreign-owned files are made on disk, and every command
is the real command line. Only the ownership test needs root (to give a file to another uid);
where the tests do not run as root it is skipped with that reason.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from dynft.cli import main
from dynft.errors import ConfigError, StateDirLockedError, UnsafeStateFileError
from dynft.settings import Settings, load_settings
from dynft.statedir import StateLock, admin_token, check_state_dir, read_holder

from helpers import free_port, keyword_events, write_jsonl

HOLD = (
    "import sys; from pathlib import Path; from dynft.statedir import StateLock; "
    "StateLock.acquire(Path(sys.argv[1])); print('locked', flush=True); sys.stdin.read()"
)


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the lock of ``tmp_path / 'state'`` until its stdin closes."""
    state = tmp_path / "state"
    state.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(state)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    try:
        yield proc
    finally:
        proc.kill()
        proc.communicate()  # reaps it and closes the pipes


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_train_and_run_refuse_a_locked_state_dir_naming_the_holder(
    holder: subprocess.Popen[str], tmp_path: Path, tiny_model_dir: Path
) -> None:
    stream = write_jsonl(tmp_path / "in.jsonl", keyword_events(2, ["alpha", "beta"]))
    args = ["--state-dir", str(tmp_path / "state"), "--model", str(tiny_model_dir), "--source", f"file:{stream}"]
    for command in ("train", "run"):
        result = CliRunner().invoke(main, [command, *args])
        assert result.exit_code == 2, result.output
        (line,) = result.output.strip().splitlines()
        assert f"in use by another dynft daemon (pid {holder.pid})" in line, line
    assert read_holder(tmp_path / "state") == holder.pid, "a refused daemon must not overwrite the holder's pid"


def test_the_lock_goes_with_its_holder_even_on_sigkill(holder: subprocess.Popen[str], tmp_path: Path) -> None:
    with pytest.raises(StateDirLockedError) as refused:
        StateLock.acquire(tmp_path / "state")
    assert refused.value.holder == holder.pid
    holder.send_signal(signal.SIGKILL)
    holder.wait()  # the fixture closes its pipes
    lock = StateLock.acquire(tmp_path / "state")  # no stale lock: flock died with its process
    try:
        assert read_holder(tmp_path / "state") == os.getpid()
        assert mode(tmp_path / "state" / "lock") == 0o600
    finally:
        lock.release()


def test_the_state_dir_is_created_private(tmp_path: Path) -> None:
    check_state_dir(tmp_path / "new" / "state")
    assert mode(tmp_path / "new" / "state") == 0o700


@pytest.mark.parametrize("name", ["ledger.db", "dead-letter.jsonl", "registry/serving.json", "lock", "admin-token"])
def test_a_symlinked_state_file_is_refused_and_its_target_untouched(
    name: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    state = tmp_path / "state"
    (state / name).parent.mkdir(parents=True, exist_ok=True)
    target = tmp_path / "elsewhere"
    target.write_text("someone else's file\n")
    (state / name).symlink_to(target)
    stream = write_jsonl(tmp_path / "in.jsonl", keyword_events(2, ["alpha", "beta"]))
    result = CliRunner().invoke(
        main, ["train", "--state-dir", str(state), "--model", str(tiny_model_dir), "--source", f"file:{stream}"]
    )
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line == (
        f"dynft: state file {state / name} is a symbolic link; dynft does not follow links in its state "
        "directory: remove it (or point --state-dir at the real directory)"
    )
    assert target.read_text() == "someone else's file\n"


def test_lock_and_token_are_opened_without_following_a_link(tmp_path: Path) -> None:
    """Past the startup check (a link planted later): O_NOFOLLOW refuses it where the file is opened."""
    state = tmp_path / "state"
    state.mkdir()
    target = tmp_path / "elsewhere"
    target.write_text("x\n")
    (state / "lock").symlink_to(target)
    with pytest.raises(UnsafeStateFileError, match="is a symbolic link"):
        StateLock.acquire(state)
    (state / "admin-token").symlink_to(target)
    with pytest.raises(UnsafeStateFileError, match="is a symbolic link"):
        admin_token(load_settings(overrides={"state_dir": str(state)}))
    assert target.read_text() == "x\n"


def test_an_admin_token_others_can_read_is_refused_with_what_to_fix(tmp_path: Path, tiny_model_dir: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    token = state / "admin-token"
    token.write_text("a-token-others-could-read\n")
    token.chmod(0o644)
    stream = write_jsonl(tmp_path / "in.jsonl", keyword_events(2, ["alpha", "beta"]))
    args = ["--state-dir", str(state), "--model", str(tiny_model_dir), "--source", f"file:{stream}"]
    result = CliRunner().invoke(main, ["run", *args])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"dynft: admin token file {token} is readable or writable by others (mode 644)")
    assert f"chmod 600 {token}" in line and "a-token-others-could-read" not in line
    token.chmod(0o600)
    assert admin_token(load_settings(overrides={"state_dir": str(state)})) == "a-token-others-could-read"


def test_an_admin_token_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another uid needs root")
    state = tmp_path / "state"
    state.mkdir()
    token = state / "admin-token"
    token.write_text("planted\n")
    token.chmod(0o600)
    os.chown(token, 65534, 65534)
    with pytest.raises(UnsafeStateFileError, match="belongs to uid 65534, not to this user"):
        admin_token(load_settings(overrides={"state_dir": str(state)}))


def test_an_empty_admin_token_file_is_refused_not_kept(tmp_path: Path) -> None:
    """Found by a review: an emptied token file was kept, and every admin request got 401/403."""
    state = tmp_path / "state"
    state.mkdir()
    token = state / "admin-token"
    token.write_text("\n")
    token.chmod(0o600)
    with pytest.raises(ConfigError, match="admin-token is empty; remove it"):
        admin_token(load_settings(overrides={"state_dir": str(state)}))


@pytest.mark.slow
def test_a_second_daemon_exits_2_naming_the_first_and_state_files_are_private(
    tiny_settings: Settings, tmp_path: Path
) -> None:
    """A real ``dynft run`` holds the directory: a second ``run`` and a ``train`` exit 2 naming its
    pid, while its own trainer child (which does not take the lock) trains. Every state file the
    daemon created is 0600, every directory 0700."""
    # One dead letter, first: the sink creates its file at start, and a record read late (intake
    # waits while the buffer is full) would leave it empty when the test reads it.
    rows: list[object] = [b"not json", *keyword_events(600, ["alpha", "beta"], seed=3)]
    stream = write_jsonl(tmp_path / "stream.jsonl", rows)
    state = tmp_path / "state"
    common = ["--model", str(tiny_settings.model.path), "--source", f"file:{stream}", "--state-dir", str(state)]
    port = free_port()
    settings = [
        "source.follow=true",
        "registry.publish_every_steps=5",
        "gate.min_holdout=8",
        "checkpoint.every_steps=5",
    ]
    cmd = [sys.executable, "-m", "dynft", "run", *common, "--port", str(port), *(f"--set={a}" for a in settings)]
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log:
        first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        wanted = ("ledger.db", "dead-letter.jsonl", "registry/serving.json", "checkpoints")
        dead = state / "dead-letter.jsonl"
        while not (all((state / name).exists() for name in wanted) and dead.stat().st_size > 0):
            assert first.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        for command in ("run", "train"):
            second = subprocess.run(
                [sys.executable, "-m", "dynft", command, *common, "--port", str(free_port())],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert second.returncode == 2, second.stderr
            assert second.stderr.strip().splitlines() == [
                f"dynft: state directory {state} is in use by another dynft daemon (pid {first.pid}); "
                "stop it first, or give this one its own --state-dir"
            ]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            text = client.get("/metrics").text
        assert 'dynft_events_total{outcome="trained"}' in text, "the trainer child runs under its parent's lock"
        restarts = [
            line for line in text.splitlines() if line.startswith('dynft_process_restarts_total{process="trainer"}')
        ]
        assert [float(line.rsplit(" ", 1)[1]) for line in restarts] == [0.0], "the trainer never restarted"
        assert first.poll() is None, "the first daemon is unaffected"
        assert json.loads(dead.read_text().splitlines()[0])["reason"]
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=90) == 0, log_path.read_text()[-3000:]
    assert mode(state) == 0o700
    seen = {p.relative_to(state).as_posix(): mode(p) for p in state.rglob("*") if "run/metrics" not in p.as_posix()}
    for name in ("lock", "admin-token", "ledger.db", "dead-letter.jsonl", "run/config.json", "registry/serving.json"):
        assert seen.get(name) == 0o600, (name, seen)
    loose = {name: oct(m) for name, m in seen.items() if m & 0o077}
    assert not loose, f"state files readable by others: {loose}"
    assert any(name.startswith("checkpoints/") for name in seen) and seen["registry"] == 0o700
