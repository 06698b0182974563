"""``dynft run``'s supervisor stays light: torch, river and numpy live in its children only.

Each process that imports torch holds about 300 MiB of private memory for it, so a supervisor
that only starts and watches children must not. The proof reads the memory maps of a real
``dynft run``'s processes: the trainer and the server map torch's library, the supervisor maps
neither torch's nor numpy's (which river, the drift detectors' library, brings along). The
trainer and the server both map the base model's safetensors file: its pages are shared.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dynft.settings import Settings

from helpers import free_port, keyword_events, write_jsonl

STARTED = re.compile(r"started (\w+) \(pid (\d+)\)")


def mapped(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/<pid>/maps (Linux)")
def test_the_supervisor_maps_no_torch_and_no_numpy_but_its_children_do(tiny_settings: Settings, tmp_path: Path) -> None:
    stream = write_jsonl(tmp_path / "in.jsonl", keyword_events(40, ["alpha", "beta"]))
    cmd = [sys.executable, "-m", "dynft", "run", "--model", str(tiny_settings.model.path), "--source"]
    cmd += [f"file:{stream}", "--state-dir", str(tmp_path / "state"), "--port", str(free_port())]
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline, children = time.monotonic() + 240, {}
        while len(children) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            children = {name: int(pid) for name, pid in STARTED.findall(log.read_text())}
            time.sleep(0.2)
        supervisor = mapped(proc.pid)
        for name in ("trainer", "server"):  # forked from the fork server, which imported torch
            assert "libtorch" in mapped(children[name]), name
        assert "libtorch" not in supervisor
        assert "/numpy/" not in supervisor
        # Both load the frozen base weights as a memory map of the one safetensors file: the page
        # cache holds them once for both (a copy in each would double the model's memory).
        weights = str(Path(str(tiny_settings.model.path)) / "model.safetensors")
        while not all(weights in mapped(children[name]) for name in ("trainer", "server")):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        assert proc.poll() is None, log.read_text()[-3000:]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_check_run_apart_raises_the_childs_error_with_its_type(tiny_settings: Settings) -> None:
    from dynft.cli import check_detectors
    from dynft.errors import ConfigError
    from dynft.settings import load_settings
    from dynft.supervisor import check_apart

    check_apart(check_detectors, tiny_settings)  # the defaults pass
    for setting in ("drift.error_detector", "drift.input_detector"):
        bad = load_settings(overrides={"state_dir": str(tiny_settings.state_dir), setting: "NoSuch"})
        with pytest.raises(ConfigError, match=r"drift detector .NoSuch. is not in river\.drift"):
            check_apart(check_detectors, bad)
