"""Reading settings from outside the environment: config files and ``--set SECTION.FIELD=VALUE`` flags."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import yaml

from dynft.errors import ConfigError


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML, YAML or JSON config file into a dict; errors name the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 text (invalid byte at offset {exc.start})") from exc
    try:
        if path.suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {path}: unknown format {path.suffix!r} (use .toml, .yaml or .json)")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {path}: not valid {path.suffix[1:].upper()}: {exc}") from exc
    except RecursionError as exc:  # valid syntax, deeper than the parser's stack
        raise ConfigError(f"config file {path}: nested too deeply to parse") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a table of sections")
    if _values_beyond(data, MAX_VALUES):  # YAML aliases can make a few lines into billions of values
        raise ConfigError(f"config file {path}: holds more than {MAX_VALUES:,} values once its aliases are expanded")
    return data


MAX_VALUES = 100_000  # far above any real configuration; below what takes seconds or gigabytes


def _values_beyond(data: Any, budget: int) -> bool:
    """Whether ``data`` holds more than ``budget`` values, a shared (aliased) one counted at every
    place it appears, as validation and printing would visit it; stops counting at the budget."""
    pending, seen = [data], 0
    while pending:
        value = pending.pop()
        seen += 1
        if seen > budget:
            return True
        if isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return False


def parse_assignment(text: str) -> tuple[str, Any]:
    """Parse a ``section.field=value`` CLI assignment; the value is JSON when it parses as JSON."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected SECTION.FIELD=VALUE")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    except RecursionError as exc:  # valid JSON, deeper than the parser's stack
        raise ConfigError(f"--set {key.strip()}: the value is nested too deeply to parse") from exc
    return key.strip(), value


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Turn ``{"trainer.lr": 1}`` into ``{"trainer": {"lr": 1}}`` (values that are None are dropped)."""
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        if value is None:
            continue
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out
