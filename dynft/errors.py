"""The exceptions dynft raises, and the one table that turns them into exit codes.

Library code raises these where the problem happens, with enough context to act on;
only the CLI turns them into a message and an exit code (``exit_code``). The code says what
the failure means for whoever runs the process, so it is decided by the error's type, never
by its message text:

- ``EXIT_OK`` (0): done.
- ``EXIT_FAILURE`` (1): a runtime failure that may clear up (a full disk, a corrupt version);
  ``dynft run`` restarts a child that exits with it, with backoff.
- ``EXIT_CONFIG`` (2): the configuration, the arguments or the environment they name are wrong
  (a bad value, a missing model, a state directory another daemon holds): starting again will
  fail again, so ``dynft run`` stops with it.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


class DynftError(Exception):
    """Base class of every error dynft raises on purpose."""

    exit_code = EXIT_FAILURE


class ConfigError(DynftError):
    """The configuration is invalid (a bad value, an unreadable config file)."""

    exit_code = EXIT_CONFIG


class InvalidSettingsError(ConfigError):
    """Settings that fail validation; the message is already one ``config error: ...`` line per field."""


class StateDirLockedError(ConfigError):
    """Another dynft daemon holds the state directory; ``holder`` is its pid (None if unknown)."""

    def __init__(self, message: str, holder: int | None) -> None:
        super().__init__(message)
        self.holder = holder


class UnsafeStateFileError(ConfigError):
    """A state file that must not be trusted: a symlink, someone else's, or readable by others."""


class StateCorruptError(ConfigError):
    """A state file is damaged past what dynft repairs by itself (a ledger that is no database, a
    serving pointer of garbage): restarting cannot help, an operator must move it aside."""


class SourceError(DynftError):
    """A source cannot be opened or read (bad URI, missing file)."""

    exit_code = EXIT_CONFIG


class ModelError(DynftError):
    """The base model cannot be loaded or does not support what was asked."""

    exit_code = EXIT_CONFIG


class RegistryError(DynftError):
    """An adapter version is missing, incomplete or cannot be written."""


class PointerUnreadableError(RegistryError):
    """``registry/serving.json`` cannot be read (an OS error): which version serves is unknown, so
    no admin action can start from it; the request is not at fault."""


class DamagedPointerError(PointerUnreadableError):
    """``registry/serving.json`` is damaged (garbage, NULs after a power loss, fields of the wrong
    type, bytes that are no UTF-8): unreadable as above, and restarting cannot help."""

    exit_code = EXIT_CONFIG


class VersionNotFoundError(RegistryError):
    """The adapter version asked for was never published, or was pruned."""

    exit_code = EXIT_CONFIG  # the argument names nothing: asking again cannot help (``dynft adapters show 999``)

    def __init__(self, version: int) -> None:
        super().__init__(f"adapter version {version} does not exist")
        self.version = version


class RegistryWriteError(RegistryError):
    """The registry cannot be written (disk full, read-only or unwritable state directory).

    Nothing that was already published or serving is affected; the same write may work later.
    """


class AdapterMismatchError(RegistryError):
    """An adapter version does not fit the model it should be loaded into."""


class BrokersUnavailableError(DynftError):
    """No Kafka broker answers (down, unreachable, restarting): transient, waited for and retried."""


class KafkaRefusedError(ConfigError):
    """A Kafka broker answered and refused: credentials, SASL mechanism, TLS certificate or authorization.

    The same configuration will be refused again, so it is a configuration error (exit 2).
    """


class ProduceError(DynftError):
    """``dynft produce`` sent every record but some, which the client or the brokers refused."""


class DeadLetterError(DynftError):
    """Dead letters are not durable yet (not delivered, or refused): their positions must not be committed."""


class VersionUnloadableError(RegistryError):
    """An adapter version exists but cannot be loaded: files missing or corrupt, non-finite weights."""


class BaseModelMismatchError(AdapterMismatchError):
    """An adapter version or checkpoint was trained on another base model than the one in use."""


class ReplicationError(DynftError):
    """The versions topics cannot be reached, read or written (the broker may come back)."""


class TermLostError(ReplicationError):
    """This trainer's elected term ended (another trainer took over): it must not publish under it."""


def exit_code(exc: BaseException) -> int:
    """The process exit code for an error that ended a command (see the module docstring).

    >>> exit_code(ConfigError("bad")), exit_code(RegistryWriteError("full")), exit_code(OSError("disk"))
    (2, 1, 1)
    """
    if isinstance(exc, DynftError):
        return exc.exit_code
    return EXIT_FAILURE  # an error no check foresaw (OSError, sqlite3.Error): may clear up, so retried
