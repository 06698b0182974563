"""The state directory: one daemon owns it, only its user can read it, no state file is a symlink.

``dynft run`` (its supervisor) and a standalone ``dynft train`` hold an exclusive ``flock`` on
``<state_dir>/lock`` for their whole life, so two trainers never interleave checkpoints,
ledger rows and versions. The lock file holds the owner's pid, which a second daemon names
when it refuses to start (exit 2). ``flock`` locks vanish with the process that held them, so
a daemon killed by SIGKILL or the OOM killer never leaves a stale lock behind.

Daemons run with umask 077: every file and directory they create (registry, ledger, dead
letters, checkpoints, run files, admin token) is 0600/0700 without each writer having to
remember it. State files are never opened through a symlink: the lock and the admin token are
opened with ``O_NOFOLLOW``, and at startup every state file the daemon writes by name is
checked with ``lstat`` (``refuse_symlinks``); after that, the directory being 0700 means only
the daemon's own user could plant one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import stat
import time
from pathlib import Path

from dynft.errors import (
    EXIT_CONFIG,
    ConfigError,
    DynftError,
    StateDirLockedError,
    UnsafeStateFileError,
    exit_code,
)
from dynft.settings import Settings

log = logging.getLogger(__name__)
PRIVATE_UMASK = 0o077
LOCK_NAME = "lock"
TOKEN_NAME = "admin-token"
# Names under the state directory that daemons write by name; none of them may be a symlink.
STATE_NAMES = (
    LOCK_NAME,
    TOKEN_NAME,
    "ledger.db",
    "ledger.db-wal",
    "ledger.db-shm",
    "ledger.db-journal",
    "dead-letter.jsonl",
    "checkpoints",
    "run",
    "run/config.json",
    "run/shots.jsonl",  # the server's fast path (dynft.serving.prototypes)
    "run/label-mix.json",  # its rows' prior (dynft.serving.labelmix), written through the next name
    "run/label-mix.json.tmp",
    "registry",
    "registry/serving.json",
    "registry/.lock",
)


def private_files() -> None:
    """Make every file this process creates from now on private to its user (0600, dirs 0700).

    Called once at the start of each daemon command, before anything is written; children
    of ``dynft run`` inherit it through the fork server.
    """
    os.umask(PRIVATE_UMASK)


def check_state_dir(path: Path) -> None:
    """Create the state directory (0700) if needed and prove it takes a durable write.

    A directory that can never be written (read-only, no permission, not a directory) is a
    configuration error: exit 2, which ``dynft run`` does not retry. A full disk may clear up,
    so it is a runtime error (exit 1) that the supervisor retries with backoff.
    """
    if path.exists() and not path.is_dir():
        raise ConfigError(f"state directory {path}: exists and is not a directory")
    probe = path / f".write-probe-{os.getpid()}"
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"dynft")
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):  # the directory may not even be readable; the error below says why
            probe.unlink(missing_ok=True)
        message = f"state directory {path}: cannot write there ({exc.strerror or exc}: {exc.filename or path})"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DynftError(f"{message}; free some space and start again") from exc
        raise ConfigError(message) from exc
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o022:
        # Not refused: a volume mounted by Kubernetes (fsGroup) or Compose may be group-writable by
        # design. The files in it are still 0600, and refuse_symlinks checks what is there now.
        log.warning("state directory %s is writable by others (mode %o); chmod 700 it if you can", path, mode)


def wait_for_state_dir(path: Path, first_delay_s: float, max_delay_s: float) -> None:
    """``check_state_dir``, tried again with doubling delays while it fails in a way that may clear up.

    For ``dynft run``, which must not stop on a full disk at startup any more than later: only a
    configuration error (exit 2) is raised. A standalone ``dynft train`` exits 1 instead and
    leaves the retry to its process manager.
    """
    delay = first_delay_s
    while True:
        try:
            check_state_dir(path)
            return
        except DynftError as exc:
            if exit_code(exc) == EXIT_CONFIG:
                raise
            log.warning("%s (trying again in %.1f s)", exc, delay)
        time.sleep(delay)
        delay = min(max_delay_s, delay * 2)


def refuse_symlinks(settings: Settings) -> None:
    """Refuse to start when a state file the daemon writes by name is a symlink (a planted file)."""
    names = [settings.state_dir / name for name in STATE_NAMES]
    names.append(settings.dead_letter_path)
    for path in names:
        if path.is_symlink():
            raise UnsafeStateFileError(
                f"state file {path} is a symbolic link; dynft does not follow links in its state "
                "directory: remove it (or point --state-dir at the real directory)"
            )


class StateLock:
    """The exclusive lock of one state directory, held until ``release`` or the process ends.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> lock = StateLock.acquire(d)
    >>> read_holder(d) == os.getpid()
    True
    >>> lock.release()
    """

    def __init__(self, fd: int, path: Path) -> None:
        self._fd, self.path = fd, path

    @classmethod
    def acquire(cls, state_dir: Path) -> StateLock:
        """Take the lock or raise ``StateDirLockedError`` naming the daemon that holds it."""
        path = state_dir / LOCK_NAME
        fd = _open_private(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = read_holder(state_dir)
            raise StateDirLockedError(
                f"state directory {state_dir} is in use by another dynft daemon (pid {holder}); "
                "stop it first, or give this one its own --state-dir",
                holder,
            ) from None
        # Only the holder writes the pid, after taking the lock: a loser never truncates it.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd, path)

    @staticmethod
    def held_by(state_dir: Path, pid: int) -> None:
        """Check that ``pid`` (the supervisor of ``dynft run``) holds the lock, for its trainer child.

        The child does not take the lock itself: its supervisor holds it for the whole run,
        restarts included, so no other daemon can slip in between two trainer lives.
        """
        holder = read_holder(state_dir)
        if holder != pid:
            raise StateDirLockedError(
                f"state directory {state_dir}: locked by pid {holder}, not by this trainer's supervisor (pid {pid})",
                holder,
            )

    def release(self) -> None:
        os.close(self._fd)  # closing the last descriptor releases the flock


def read_holder(state_dir: Path) -> int | None:
    """The pid written in the lock file, or None when it is missing or unreadable."""
    try:
        fd = _open_private(state_dir / LOCK_NAME, os.O_RDONLY)
    except (OSError, UnsafeStateFileError):
        return None
    try:
        text = os.read(fd, 32).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    return int(text) if text.isdigit() else None


def _open_private(path: Path, flags: int) -> int:
    """``os.open`` a state file without following a symlink; mode 0600 when it is created."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeStateFileError(
                f"state file {path} is a symbolic link; dynft does not follow links in its state directory: remove it"
            ) from exc
        raise


def admin_token(settings: Settings) -> str:
    """The configured admin token, or one generated once and kept in ``<state_dir>/admin-token`` (0600).

    An existing token file is trusted only when it belongs to this user and no one else can
    read it: a token others could read (or write) would give them the admin API.
    """
    if settings.server.admin_token is not None:
        return settings.server.admin_token.get_secret_value()
    path = settings.state_dir / TOKEN_NAME
    try:
        fd = _open_private(path, os.O_RDONLY)
    except FileNotFoundError:
        return _generate_token(path)
    except OSError as exc:
        raise ConfigError(f"cannot read the admin token file {path} ({exc.strerror or exc})") from exc
    with os.fdopen(fd, "r") as fh:
        info = os.fstat(fh.fileno())
        if info.st_uid != os.geteuid():
            raise UnsafeStateFileError(
                f"admin token file {path} belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()}); "
                "remove it so that a new one is generated, or set server.admin_token"
            )
        if info.st_mode & 0o077:
            raise UnsafeStateFileError(
                f"admin token file {path} is readable or writable by others (mode {stat.S_IMODE(info.st_mode):o}); "
                f"run `chmod 600 {path}` if the token was not exposed, else remove it to have a new one generated"
            )
        token = fh.read().strip()
    if not token:  # emptied (a power loss, a mistaken edit): no request could ever match it
        raise ConfigError(f"admin token file {path} is empty; remove it so that a new one is generated")
    return token


def _generate_token(path: Path) -> str:
    token = secrets.token_urlsafe(24)
    created = False
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = _open_private(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        created = True
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
    except OSError as exc:
        if created:  # an empty token file (disk full) would lock the admin API out on every later start
            with contextlib.suppress(OSError):
                path.unlink()
        raise ConfigError(
            f"cannot create the admin token file {path} ({exc.strerror or exc}); "
            "make the state directory writable or set server.admin_token"
        ) from exc
    log.info("generated an admin token in %s", path)
    return token
