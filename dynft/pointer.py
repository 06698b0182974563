"""The serving pointer (``registry/serving.json``): which version serves, whether an operator
pinned it, and the versions that served before it (for rollback), with the checks that tell a
pointer from a damaged file."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dynft.errors import RegistryError


@dataclass
class ServingPointer:
    version: int | None = None
    pinned: bool = False
    reason: str = ""
    updated_at: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)  # earlier serving versions, newest first


# The largest version number or epoch taken from a file or a topic: exact as a float (a metric's
# value) and in every JSON reader; a larger one can only be garbage.
MAX_NUMBER = 2**53


def is_number(value: object, low: int = 0) -> bool:
    """An int (not a bool) from ``low`` to below ``MAX_NUMBER``."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < MAX_NUMBER


def pointer_problem(data: object) -> str | None:
    """Why ``data`` (serving.json, parsed) is no serving pointer, or None."""
    if not isinstance(data, dict) or set(data) - set(ServingPointer.__dataclass_fields__):
        return "not an object of the pointer's fields"
    version, history = data.get("version"), data.get("history", [])
    if version is not None and not is_number(version):
        return "version is not a version number (an integer from 0 to 2^53)"
    if not isinstance(history, list) or not all(isinstance(h, dict) and is_number(h.get("version")) for h in history):
        return "history is not a list of versions"
    if not isinstance(data.get("pinned", False), bool) or not isinstance(data.get("reason", ""), str):
        return "pinned or reason of the wrong type"
    if not isinstance(data.get("updated_at", ""), str):
        return "updated_at is not a time stamp"
    return None


def damaged_pointer(path: Path, problem: str) -> str:
    return (
        f"{path} is damaged ({problem}); move it aside (then `dynft adapters list` shows the versions, "
        "and the newest version the gate promotes serves) or restore it from a backup"
    )


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def rollback_target(current: ServingPointer, existing: list[int]) -> int:
    """The most recent earlier serving version that still exists."""
    earlier = [h["version"] for h in current.history if h["version"] in existing and h["version"] != current.version]
    if not earlier:
        raise RegistryError("no earlier serving version to roll back to")
    return int(earlier[0])
