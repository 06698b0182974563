"""Shared pieces of the benchmark harness: results, progress, statistics, fresh processes."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

RESULTS = Path(__file__).parent / "results"
T = TypeVar("T")
_STARTED = time.time()


@dataclass
class Result:
    """One comparison: dynft's figure, the baseline's (same run, same machine), and their ratio.

    ``ratio`` is always "dynft relative to the baseline, higher is better": dynft / baseline
    for rates, baseline / dynft for latencies. A benchmark that could not run is a row with
    ``skipped`` set and no figures.
    """

    name: str
    metric: str  # what the figures measure
    unit: str
    dynft: float | None
    baseline: float | None
    baseline_name: str
    higher_is_better: bool = True
    goal: str = ""
    met: bool | None = None
    skipped: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.dynft is None or self.baseline is None or not finite(self.dynft) or not finite(self.baseline):
            return None
        num, den = (self.dynft, self.baseline) if self.higher_is_better else (self.baseline, self.dynft)
        return num / den if den else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


_checkpoint: list[Callable[[list[Result]], None]] = []  # set by the harness for the benchmark that runs


def on_checkpoint(write_partial: Callable[[list[Result]], None] | None) -> None:
    """The harness's writer of a running benchmark's results so far (None: nothing to write to)."""
    _checkpoint[:] = [] if write_partial is None else [write_partial]


def checkpoint(results: list[Result]) -> None:
    """A benchmark hands over what it has measured so far, written at once: a run cut short keeps it."""
    for write_partial in _checkpoint:
        write_partial(results)


def skipped(name: str, reason: str) -> Result:
    return Result(name, "-", "-", None, None, "-", skipped=reason)


def finite(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def progress(message: str) -> None:
    """One progress line on stderr, with the seconds since the harness started."""
    print(f"[{time.time() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rounded(x: float, digits: int = 3) -> float | None:
    """For details: a float rounded to ``digits`` significant digits, None when not finite."""
    if not finite(x):
        return None
    return float(f"{x:.{digits}g}")


def in_fresh_process(isolate: bool, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a new interpreter, so no contender inherits another's heap, threads or GC state.

    The process is not a daemon, so ``fn`` may start processes of its own. With ``isolate`` off
    (the smoke suite) ``fn`` runs in this process, to stay fast.
    """
    if not isolate:
        return fn(*args)
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(send, fn, args), name=f"bench-{fn.__name__}")
    process.start()
    send.close()
    try:
        ok, value = receive.recv()
    except EOFError:
        process.join()
        raise RuntimeError(f"{fn.__name__} died in its process (exit code {process.exitcode})") from None
    process.join()
    if not ok:
        raise RuntimeError(f"{fn.__name__} failed in its process:\n{value}")
    return value  # type: ignore[no-any-return]


def _child(send: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        send.send((True, fn(*args)))
    except BaseException:
        send.send((False, traceback.format_exc()))
    finally:
        send.close()
        exit_now()


def exit_now(code: int = 0) -> None:
    """End a benchmark child at once: its work is sent, and interpreter teardown only adds noise
    (triton, imported by peft, reports leaked nanobind objects at exit) and seconds."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def quiet() -> None:
    """Silence library chatter in a benchmark process (progress lines stay)."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dynft").setLevel(logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def machine(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "device": device,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write(
    out_dir: Path, suite: str, device: str, results: list[Result], started: float, notes: dict[str, Any]
) -> tuple[Path, Path, dict[str, Any]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{suite}-{device}"
    data = {
        "suite": suite,
        "command": f"python -m benchmarks --suite {suite} --device {device}",
        "machine": machine(device),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 1),
        "notes": notes,
        "results": [_plain(r.as_dict()) for r in results],
    }
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    _replace(json_path, json.dumps(data, indent=1, allow_nan=False) + "\n")
    _replace(md_path, markdown(data) + "\n")
    return json_path, md_path, data


def _replace(path: Path, text: str) -> None:
    """Write ``text`` under a temporary name, then rename: a run killed mid-write leaves the last whole file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _plain(value: Any) -> Any:
    """JSON-safe: non-finite floats become null (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def fmt(x: float | None) -> str:
    return "-" if x is None or not finite(x) else f"{x:.4g}"


def markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    where = m.get("gpu") or f"{m['cpus']}-core CPU"
    lines = [
        f"# Benchmarks: {data['suite']} suite on {where}",
        "",
        f"`{data['command']}`, finished {data['finished_at']} in {data['seconds']} s "
        f"(torch {m['torch']}, Python {m['python']}, load average at the end {m['load_average']}).",
        "",
        "Every ratio compares two figures measured side by side in this run on this machine, "
        "so it holds even when other processes share the CPU; absolute figures do not.",
        "",
        "| benchmark | metric | unit | dynft | baseline | ratio | goal | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        if r["skipped"]:
            lines.append(f"| {r['name']} | skipped: {r['skipped']} | | | | | | |")
            continue
        met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(
            f"| {r['name']} | {r['metric']} | {r['unit']} | {fmt(r['dynft'])} | {fmt(r['baseline'])} "
            f"({r['baseline_name']}) | {ratio} | {r['goal'] or '-'} | {met} |"
        )
    if data.get("notes"):
        lines += ["", "Setup:", ""]
        lines += [f"- {k}: {v}" for k, v in data["notes"].items()]
    details = [r for r in data["results"] if r["details"]]
    if details:
        lines += ["", "Details:", ""]
        for r in details:
            lines.append(f"- **{r['name']}**: " + ", ".join(f"{k} = {v}" for k, v in r["details"].items()))
    return "\n".join(lines)
