"""``dynft.runtime``: what a frozen garbage collector must still do at exit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dynft.supervisor import PRELOAD


def leak_reports(then: str) -> list[str]:
    """stderr lines about leaks of a process that imports the fork server's preload, then runs ``then``."""
    modules = [m for m in PRELOAD if m != "dynft.forkserver"]
    code = f"import {', '.join(modules)}; {then}"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return [line for line in done.stderr.splitlines() if "leaked" in line]


def test_the_fork_servers_preload_exits_without_leak_reports() -> None:
    """The fork server imports ``PRELOAD``, whose last module freezes the collector. Frozen objects
    are never collected, and nanobind (triton's bindings, which ``import torch`` loads) reported
    every one of its objects still alive at exit as leaked: 27 lines on stderr at every stop of
    ``dynft run``. A bare ``gc.freeze()`` is the control: where it reports nothing (a torch without
    triton, a nanobind that stays quiet), there is nothing to guard against."""
    if not leak_reports("import gc; gc.collect(); gc.freeze()"):
        pytest.skip("a frozen heap at exit makes no leak reports with these libraries")
    assert leak_reports("import dynft.forkserver") == []
