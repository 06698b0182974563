"""``dynft run``: starts the trainer and the server as child processes and keeps them running.

Lifecycle, as in uvicorn: ``startup`` (write the resolved config, start both children),
``main_loop`` (restart a child that died, with exponential backoff, until a signal arrives;
a child that exits 2, a configuration error, would fail again: it stops the run with exit 2)
and ``shutdown`` (SIGTERM to the trainer and the server, so the trainer finishes its step and
publishes; SIGKILL after ``run.shutdown_timeout_s``).

The children run in their own session, so a Ctrl-C in the terminal reaches only the
supervisor, which then stops them once and in order.

Children are forked from a fork server that imported torch, transformers, peft and dynft once
(multiprocessing's ``forkserver`` with a preload): importing those costs about 10 s of CPU on a
small machine, so a crashed server is back in the time it takes to load the model, not to
import the world again. The supervisor itself imports none of them (torch alone holds about
300 MiB of private memory in every process that imports it): checks that need them run in a
forked child that exits (``check_apart``), and ``tests/test_supervisor_memory.py`` holds it to
that. The fork server freezes its garbage collector's view of what it imported
(``dynft.forkserver``), so the children's collections leave those pages shared.
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import os
import pickle
import select
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import reduction
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from prometheus_client import CollectorRegistry

from dynft import metrics
from dynft.errors import EXIT_CONFIG, ConfigError, DynftError
from dynft.settings import Settings

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
TRIM_INTERVAL_S = 5.0  # how often a child hands freed heap pages back (see _trim_heap)
REPLICA_DIR = "replica"  # under the state directory: the registry an elected trainer's server follows into
# Imported once, in the fork server; dynft.forkserver last (it freezes what the others created).
PRELOAD = ["dynft.cli", "dynft.loop", "dynft.serving.server", "dynft.forkserver"]


@dataclass
class Child:
    name: str
    argv: list[str]  # arguments of the dynft command line
    process: BaseProcess | None = None
    started_at: float = 0.0
    backoff_s: float = 0.0
    restart_at: float | None = None
    finished: bool = False  # exited 0 on its own: nothing to restart
    restarts: int = field(default=0)
    stdin: bool = False  # reads the supervisor's standard input (the trainer of ``--source file:-``)


class _InheritedFd:
    """A descriptor of this process that a forked-from-the-fork-server child receives as its own.

    multiprocessing sends descriptors to the fork server with the child's arguments, but only
    while it pickles them (``reduction.DupFd`` asks the spawning ``Popen``), hence the hook.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Callable[[Any], int], tuple[Any]]:
        return _detached, (reduction.DupFd(self.fd),)


def _detached(dup: Any) -> int:
    return int(dup.detach())


def _die_with_parent() -> None:
    """Ask Linux for SIGTERM when the parent dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: children then outlive a killed supervisor
        pass


def _follow(supervisor: int) -> None:
    """SIGTERM this process when the supervisor dies, even by SIGKILL.

    The fork server, not the supervisor, is a child's parent, and it outlives the supervisor as
    long as a child lives (it holds its own liveness pipe open through them), so PDEATHSIG alone
    would leave both running forever. A thread waits on a pidfd of the supervisor instead.
    """
    try:
        fd = os.pidfd_open(supervisor)
    except ProcessLookupError:  # gone already
        os.kill(os.getpid(), signal.SIGTERM)
        return
    except (AttributeError, OSError):  # no pidfds (not Linux >= 5.3): PDEATHSIG has to do
        return

    def wait() -> None:
        select.select([fd], [], [])
        log.warning("the supervisor (pid %d) is gone; stopping", supervisor)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, name="dynft-follow-supervisor", daemon=True).start()


def _trim_heap(interval_s: float = TRIM_INTERVAL_S) -> None:
    """Hand freed heap pages back to the kernel every ``interval_s`` (glibc only; else nothing).

    glibc keeps what a process frees on its heap for reuse; a trainer's steps, gate scoring and
    checkpoints free hundreds of MiB in pieces that the heap's top never releases, so the
    process keeps its peak forever. ``malloc_trim(0)`` returns every free page, wherever it is;
    it takes milliseconds and only malloc's own locks, so the training thread barely notices.
    """
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return

    def loop() -> None:
        while True:
            time.sleep(interval_s)
            trim(0)

    threading.Thread(target=loop, name="dynft-trim-heap", daemon=True).start()


def _child_main(argv: list[str], supervisor: int, stdin: int | None = None) -> None:
    """Body of a child, forked from the fork server: run ``dynft <argv>`` and exit with its code.

    ``stdin``: the supervisor's standard input, received as a descriptor; multiprocessing gives
    every child ``/dev/null`` instead, which would leave ``--source file:-`` reading nothing.
    """
    if stdin is not None:
        os.dup2(stdin, 0)
        os.close(stdin)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's standard input, never closed
    _die_with_parent()
    _follow(supervisor)
    _trim_heap()
    os.setsid()
    # Children read the resolved config file only: DYNFT_* variables were already applied by
    # the supervisor, and applying them again would undo CLI flags that overrode them.
    for key in [k for k in os.environ if k.startswith("DYNFT_")]:
        del os.environ[key]
    from dynft.cli import main

    main.main(args=argv, prog_name="dynft")  # raises SystemExit with the command's exit code


def token_origin(settings: Settings) -> str:
    """Where the admin token comes from, for the startup line (never the token)."""
    token = settings.server.admin_token
    if token is None:
        return str(settings.state_dir / "admin-token")
    return "from config" if token.get_secret_value() else "none: server.admin_token is empty, the admin API is locked"


def elected_follow(settings: Settings) -> str | None:
    """The versions topic that the co-located server of an elected trainer follows, or None.

    An elected trainer's own registry is not what users should be served: a standby's is only as
    new as its last term, and a sharded trainer's holds the newest versions of its own tasks only.
    Its server follows the versions topic instead, like a replica (with its own registry, beside
    the trainer's), so every trainer's host serves every task's current version.
    """
    k = settings.kafka
    if not (k.election and k.versions_topic):
        return None
    from dynft.replication.feed import versions_servers

    return f"kafka://{','.join(versions_servers(settings))}/{k.versions_topic}"


def check_apart(check: Callable[..., object], *args: Any) -> None:
    """Run ``check(*args)`` in a forked child and raise its error, of the same type, here.

    What the check imports (river and numpy for the drift detectors) stays in the child, which
    exits. Call it before this process starts any thread (``preflight`` runs first): a fork
    copies only the calling thread.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: reports through the pipe and never returns
        try:
            os.close(read)
            payload = b""
            try:
                check(*args)
            except BaseException as exc:  # every failure goes back to the parent
                payload = _pickled(exc)
            with os.fdopen(write, "wb") as fh:
                fh.write(payload)
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        payload = fh.read()
    _, status = os.waitpid(pid, 0)
    if not payload:
        if os.waitstatus_to_exitcode(status) != 0:  # died before it could report (a signal, a crash)
            raise DynftError(f"preflight check {getattr(check, '__name__', check)} died (status {status})")
        return
    try:
        error = pickle.loads(payload)  # from our own child: trusted
    except Exception as exc:  # an exception type that does not unpickle (its own __init__ arguments)
        raise DynftError(f"preflight check {getattr(check, '__name__', check)} failed") from exc
    raise error


def _pickled(exc: BaseException) -> bytes:
    try:
        return pickle.dumps(exc)
    except Exception:  # unpicklable contents: the type's name and message still tell the story
        return pickle.dumps(DynftError(f"{type(exc).__name__}: {exc}"))


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.run_dir = settings.state_dir / "run"
        self.should_exit = threading.Event()
        self.exit_code = 0
        self.children: list[Child] = []
        self.context = multiprocessing.get_context("forkserver")

    def startup(self) -> None:
        reads_stdin = self.settings.source.uri == "file:-"
        if reads_stdin and sys.stdin is None:  # Python's own sign that descriptor 0 was closed at start
            raise ConfigError("source file:-: this process has no standard input (it was closed)")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics_dir = self.run_dir / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics.enable_multiprocess(metrics_dir)  # before any metric exists in this process
        self.metrics = metrics.SupervisorMetrics(CollectorRegistry())
        config_path = self.run_dir / "config.json"
        fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:  # holds the admin token, hence 0600
            json.dump(self.settings.secret_dump(), fh, indent=1)
        # After enable_multiprocess: the fork server inherits the metrics directory variable.
        self.context.set_forkserver_preload(PRELOAD)
        # This process holds the state directory's lock for the whole run; the trainer checks that.
        trainer = ["train", "--config", str(config_path), "--colocated", "--supervisor-pid", str(os.getpid())]
        self.children = [
            Child("trainer", trainer, stdin=reads_stdin),
            Child("server", ["serve", "--config", str(config_path)]),
        ]
        follow = elected_follow(self.settings)
        if follow is not None:  # an elected trainer's server serves what every replica serves
            self.children[1].argv += ["--follow", follow, "--replica-dir", str(self.settings.state_dir / REPLICA_DIR)]
        for child in self.children:
            self._spawn(child)
        s = self.settings.server
        log.info(
            "dynft is starting: http://%s:%s (admin token: %s)",  # the server logs when it listens
            s.host,
            s.port or "<a port the system chooses: the server's log says which>",
            token_origin(self.settings),
        )

    def _spawn(self, child: Child) -> None:
        if child.process is not None:
            child.process.close()  # the dead one's handles
        stdin = _InheritedFd(0) if child.stdin else None
        process = self.context.Process(
            target=_child_main, args=(child.argv, os.getpid(), stdin), name=f"dynft-{child.name}"
        )
        process.start()
        child.process = process
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
        code = child.process.exitcode
        if code is None:
            if now - child.started_at > 60:
                child.backoff_s = 0.0  # healthy for a minute: the next crash restarts quickly again
            return
        metrics.mark_dead(child.process.pid or 0)
        if code == 0:
            others = [c.name for c in self.children if c is not child and not c.finished]
            verb = "goes" if len(others) == 1 else "go"
            going_on = f"; the {' and '.join(others)} {verb} on until stopped (Ctrl-C or SIGTERM)" if others else ""
            log.info("%s finished%s", child.name, going_on)
            child.finished = True
            return
        if code == EXIT_CONFIG:  # it will fail again the same way: do not restart it
            log.error("%s exited with a configuration error; stopping", child.name)
            self.exit_code = EXIT_CONFIG
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
        live = [c.process for c in self.children if c.process is not None and c.process.exitcode is None]
        for process in live:
            process.terminate()  # SIGTERM
        for process in live:
            process.join(timeout=max(0.1, deadline - time.monotonic()))
            if process.exitcode is None:
                log.error("pid %d did not stop in time; killing it", process.pid)
                process.kill()
                process.join()
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
