"""The exceptions dynft raises.

Library code raises these where the problem happens, with enough context to act on;
only the CLI turns them into a message and an exit code.
"""

from __future__ import annotations


class DynftError(Exception):
    """Base class of every error dynft raises on purpose."""


class ConfigError(DynftError):
    """The configuration is invalid (a bad value, an unreadable config file)."""


class SourceError(DynftError):
    """A source cannot be opened or read (bad URI, missing file)."""


class ModelError(DynftError):
    """The base model cannot be loaded or does not support what was asked."""


class RegistryError(DynftError):
    """An adapter version is missing, incomplete or cannot be written."""


class RegistryWriteError(RegistryError):
    """The registry cannot be written (disk full, read-only or unwritable state directory).

    Nothing that was already published or serving is affected; the same write may work later.
    """


class AdapterMismatchError(RegistryError):
    """An adapter version does not fit the model it should be loaded into."""


class ReplicationError(DynftError):
    """The versions topics cannot be reached, read or written (the broker may come back)."""
