"""``dynft run``: starts the trainer and the server as child processes and keeps them running.

Lifecycle, as in uvicorn: ``startup`` (write the resolved config, start both children),
``main_loop`` (restart a child that died, with exponential backoff, until a signal arrives)
and ``shutdown`` (SIGTERM to the trainer and the server, so the trainer finishes its step and
publishes; SIGKILL after ``run.shutdown_timeout_s``).

The children run in their own session, so a Ctrl-C in the terminal reaches only the
supervisor, which then stops them once and in order.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from types import FrameType

from prometheus_client import CollectorRegistry

from dynft import metrics
from dynft.settings import Settings

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
CONFIG_ERROR_EXIT = 2  # a child that exits with this code will fail again: do not restart it


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff_s: float = 0.0
    restart_at: float | None = None
    finished: bool = False  # exited 0 on its own: nothing to restart
    restarts: int = field(default=0)


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux for SIGTERM when the supervisor dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: children then outlive a killed supervisor
        pass


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.run_dir = settings.state_dir / "run"
        self.should_exit = threading.Event()
        self.exit_code = 0
        self.children: list[Child] = []

    def startup(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics_dir = self.run_dir / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics.enable_multiprocess(metrics_dir)  # before any metric exists in this process
        self.metrics = metrics.SupervisorMetrics(CollectorRegistry())
        config_path = self.run_dir / "config.json"
        fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:  # holds the admin token, hence 0600
            json.dump(self.settings.secret_dump(), fh, indent=1)
        base = [sys.executable, "-m", "dynft"]
        self.children = [
            Child("trainer", [*base, "train", "--config", str(config_path), "--colocated"]),
            Child("server", [*base, "serve", "--config", str(config_path)]),
        ]
        for child in self.children:
            self._spawn(child)
        s = self.settings.server
        log.info(
            "dynft is up: http://%s:%d (admin token: %s)",
            s.host,
            s.port,
            "from config" if s.admin_token else self.settings.state_dir / "admin-token",
        )

    def _spawn(self, child: Child) -> None:
        # Children read the resolved config file only: DYNFT_* variables were already applied
        # here, and applying them again would undo CLI flags that overrode them.
        env = {k: v for k, v in os.environ.items() if not k.startswith("DYNFT_")}
        child.process = subprocess.Popen(child.argv, env=env, start_new_session=True, preexec_fn=_die_with_parent)
        child.started_at = time.monotonic()
        child.restart_at = None
        log.info("started %s (pid %d)", child.name, child.process.pid)

    def main_loop(self) -> None:
        while not self.should_exit.is_set():
            for child in self.children:
                self._check(child)
            self.should_exit.wait(0.5)

    def _check(self, child: Child) -> None:
        now = time.monotonic()
        if child.process is None or child.finished:
            return
        if child.restart_at is not None:
            if now >= child.restart_at:
                self._spawn(child)
            return
        code = child.process.poll()
        if code is None:
            if now - child.started_at > 60:
                child.backoff_s = 0.0  # healthy for a minute: the next crash restarts quickly again
            return
        metrics.mark_dead(child.process.pid)
        if code == 0:
            log.info("%s finished", child.name)
            child.finished = True
            return
        if code == CONFIG_ERROR_EXIT:
            log.error("%s exited with a configuration error; stopping", child.name)
            self.exit_code = CONFIG_ERROR_EXIT
            self.should_exit.set()
            return
        r = self.settings.run
        child.backoff_s = min(r.restart_backoff_max_s, child.backoff_s * 2 or r.restart_backoff_s)
        child.restart_at = now + child.backoff_s
        child.restarts += 1
        self.metrics.restarts.labels(child.name).inc()
        log.error(
            "%s exited with code %d; restarting in %.1f s (restart %d)",
            child.name,
            code,
            child.backoff_s,
            child.restarts,
        )

    def shutdown(self) -> None:
        deadline = time.monotonic() + self.settings.run.shutdown_timeout_s
        live = [c.process for c in self.children if c.process is not None and c.process.poll() is None]
        for process in live:
            process.send_signal(signal.SIGTERM)
        for process in live:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("pid %d did not stop in time; killing it", process.pid)
                process.kill()
                process.wait()
        log.info("dynft stopped")

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.startup()
            self.main_loop()
        finally:
            self.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.exit_code

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        self.should_exit.set()
