"""Argument types shared by the quality tools: a bad number is argparse's one-line error, not a
ZeroDivisionError or an empty table minutes later."""

from __future__ import annotations

import argparse
from pathlib import Path


def positive(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def one_or_more(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not 1 or more")
    return value


def datasets_in(data: Path) -> list[str]:
    """The prepared datasets (``benchmarks/quality/data/<name>/``), for ``choices``."""
    return sorted(p.name for p in data.iterdir() if (p / "train.jsonl").is_file())


def known_names(parser: argparse.ArgumentParser, option: str, given: list[str], known: list[str]) -> list[str]:
    """``given``, each one of ``known``; otherwise argparse's error naming the choices."""
    unknown = [name for name in given if name not in known]
    if unknown:
        parser.error(f"{option} {unknown[0]}: not one of {', '.join(known)}")
    return given
