"""Served accuracy: what users of a running daemon are answered, not what its trainer predicted.

``python -m benchmarks.quality.served --suite quick [--rate 20] [--events N] [--streams a,b] [--jsonl F ...]``

``--jsonl F`` (repeatable) adds a stream from any JSON Lines file of ``{"text", "label"}`` rows,
in file order (``streams.from_jsonl``): another dataset, fed as a user would stream it.

For each stream, a real ``dynft run`` (trainer and co-located HTTP server, file source with
``source.follow = true``) starts on an empty file. Events are fed at a fixed rate: each is
first sent to ``POST /v1/predict`` and only then appended to the file, so the score is exactly
what the server answered before the daemon could learn from the event. An answer refused
(503: no version serves yet) counts as wrong: users got nothing useful. Beside it, on the same
events: the trainer's own prequential accuracy (the ``dynft`` method of the suite, run at its
own pace) and river's online models (predict-then-learn, perfect freshness).

Writes ``served-<suite>.json`` and ``.md`` under ``benchmarks/results/quality/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.quality.methods import RIVER_METHODS, run_method
from benchmarks.quality.streams import DATA, Stream, build, from_jsonl
from benchmarks.quality.suites import SUITES, Suite, dynft_overrides

RESULTS = Path(__file__).parents[1] / "results" / "quality"
STARTUP_S = 600.0  # a daemon starting on a loaded 2-core machine has taken over 180 s


def daemon_env(
    suite: Suite, state: Path, source: Path, port: int, extra: dict[str, Any] | None = None
) -> dict[str, str]:
    """The suite's dynft settings as DYNFT_ variables, but with the shipped time-based publishing:
    here freshness in seconds is what is measured. ``extra``: more settings (``--set``)."""
    overrides = dynft_overrides(suite, "dynft")
    for key in ("registry.publish_interval_s", "checkpoint.interval_s"):
        overrides.pop(key)
    overrides |= {
        "state_dir": str(state),
        "source.uri": f"file:{source}",
        "source.follow": True,
        "server.port": port,
        **(extra or {}),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNFT_")}
    for key, value in overrides.items():
        if value is not None:
            name = "DYNFT_" + key.upper().replace(".", "__")
            env[name] = json.dumps(value) if isinstance(value, bool | list | dict) else str(value)  # as dynft reads
    return env | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ask(base: str, text: str) -> tuple[str | None, int | None, list[str], bool]:
    """The server's label, version, the labels it could answer and whether the fast path took
    part, for ``text``; (None, None, [], False) when it refuses (nothing to answer with yet)."""
    body = json.dumps({"texts": [text]}).encode()
    request = urllib.request.Request(f"{base}/v1/predict", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 503:
            return None, None, [], False
        raise
    best = answer["predictions"][0]
    fast = bool(answer.get("fast_path", False))
    return str(best["label"]), int(answer["adapter_version"]), list(best["scores"]), fast


def wait_for_http(base: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dynft run exited with {process.returncode} before its server answered")
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise RuntimeError(f"the server did not answer within {STARTUP_S:.0f} s")


def feed(
    stream: Stream, suite: Suite, rate: float, events: int, workdir: Path, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run a daemon on ``stream``'s first ``events`` events fed at ``rate``; what it answered."""
    source, port = workdir / "events.jsonl", free_port()
    source.write_text("")
    base = f"http://127.0.0.1:{port}"
    log = (workdir / "daemon.log").open("wb")
    env = daemon_env(suite, workdir / "state", source, port, extra)
    process = subprocess.Popen([sys.executable, "-m", "dynft", "run"], env=env, stdout=log, stderr=log)
    answers: list[str | None] = []
    versions: list[int | None] = []
    knew: list[bool] = []  # whether the answer could name the event's label at all
    fast: list[bool] = []  # whether the fast path's prototype rows took part in the answer
    try:
        wait_for_http(base, process)
        started = time.monotonic()
        with source.open("a", encoding="utf-8") as out:
            for i, (text, label) in enumerate(stream.events[:events]):
                time.sleep(max(0.0, started + i / rate - time.monotonic()))
                answer, version, labels, fast_path = ask(base, text)
                answers.append(answer)
                versions.append(version)
                knew.append(label in labels)
                fast.append(fast_path)
                out.write(json.dumps({"id": stream.event_id(i), "text": text, "label": label}) + "\n")
                out.flush()
        behind = time.monotonic() - started - events / rate
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
    return {
        "answers": answers,
        "versions": versions,
        "knew": knew,
        "fast": fast,
        "feed_behind_s": round(max(0.0, behind), 1),
    }


def accuracy(truths: list[str], answers: list[str | None]) -> float:
    return sum(a == t for a, t in zip(answers, truths, strict=True)) / max(1, len(truths))


def rolling(truths: list[str], answers: list[str | None], window: int, every: int) -> list[tuple[int, float]]:
    """(event index, accuracy of the answers to the last ``window`` events), every ``every`` events."""
    hits = [a == t for a, t in zip(answers, truths, strict=True)]
    out = []
    for i in range(min(window, len(hits)) - 1, len(hits)):
        if i % every == 0 or i == len(hits) - 1:
            start = max(0, i + 1 - window)
            out.append((i, round(sum(hits[start : i + 1]) / (i + 1 - start), 4)))
    return out


def on_positions(truths: list[str], answers: list[str | None], positions: list[int]) -> float:
    """Served accuracy on the events at ``positions`` only (those the trainer scored)."""
    return accuracy([truths[i] for i in positions], [answers[i] for i in positions])


def score(stream: Stream, suite: Suite, served: dict[str, Any], events: int, compare: bool) -> dict[str, Any]:
    truths = [label for _, label in stream.events[:events]]
    answers = served["answers"]
    quarter = max(1, events // 4)
    out: dict[str, Any] = {
        "events": events,
        "served_accuracy": round(accuracy(truths, answers), 4),
        "served_by_quarter": [
            round(accuracy(truths[i : i + quarter], answers[i : i + quarter]), 4) for i in range(0, events, quarter)
        ],
        "unanswered": sum(a is None for a in answers),
        "first_answered_at": next((i for i, a in enumerate(answers) if a is not None), None),
        "versions_seen": len({v for v in served["versions"] if v is not None}),
        "fast_path_answers": sum(served.get("fast", [])),
        "feed_behind_s": served["feed_behind_s"],
        "curve": rolling(truths, answers, suite.window, max(1, suite.window // 5)),
    }
    if "knew" in served:  # why an answer was wrong: a version that lacked the label cannot be right
        knew = served["knew"]
        out["answered_knowing_label"] = round(sum(knew) / max(1, events), 4)
        right = sum(a == t for a, t, k in zip(answers, truths, knew, strict=True) if k)
        out["served_accuracy_when_known"] = round(right / sum(knew), 4) if any(knew) else None
    if compare:  # the same events, each method at its own pace (predict, then learn)
        cut = Stream(stream.name, stream.kind, stream.events[:events], [p for p in stream.phases if p.start < events])
        for method in ("dynft", *RIVER_METHODS):
            run = run_method(cut, suite, method)
            on = dict(zip(run.positions, run.predictions, strict=True))
            same = [i for i in range(events) if i in on]  # dynft scores only the events it trains on
            out[f"{method} prequential"] = round(accuracy([truths[i] for i in same], [on[i] for i in same]), 4)
            if method == "dynft":
                out["served on dynft's events"] = round(on_positions(truths, answers, same), 4)
    return out


def markdown(results: dict[str, Any], command: str) -> str:
    rows = results["streams"]
    columns = sorted({k for r in rows.values() for k in r if k.endswith("prequential") or k.startswith("served on")})
    lines = [
        f"# Served accuracy, {results['suite']} suite",
        "",
        f"`{command}` — {results['rate']} events/s, {results['machine']}",
        "",
        "| stream | events | served | by quarter | unanswered | first answer at | versions | version knew the label "
        "| served when it knew | fast path answers | " + " | ".join(columns) + " |",
        "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(columns),
    ]
    for name, r in rows.items():
        quarters = " / ".join(f"{q:.2f}" for q in r["served_by_quarter"])
        extra = " | ".join(f"{r.get(c, float('nan')):.3f}" for c in columns)
        lines.append(
            f"| {name} | {r['events']} | {r['served_accuracy']:.3f} | {quarters} | {r['unanswered']} | "
            f"{r['first_answered_at']} | {r['versions_seen']} | {fraction(r.get('answered_knowing_label'))} | "
            f"{fraction(r.get('served_accuracy_when_known'))} | {r.get('fast_path_answers', 0)} | {extra} |"
        )
    lines += ["", KNEW_NOTE]
    return "\n".join(lines) + "\n"


KNEW_NOTE = (
    "*version knew the label*: the share of events answered by a version whose label map held the event's "
    "label; an answer by a version that did not can only be wrong (on a class-incremental stream, a version "
    "that lags a phase behind knows none of the phase's labels; with the fast path, the labels of its "
    "prototype rows count too). *served when it knew*: accuracy on those. *fast path answers*: events answered "
    "with prototype rows beside the version's head (`server.prototypes`); version 0 answers before the first "
    "version from prototypes alone."
)


def fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def serve(
    stream: Stream, suite: Suite, rate: float, events: int, logs: Path, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``feed`` in a temporary directory; the daemon's log is kept in ``logs`` (why a version came late)."""
    with tempfile.TemporaryDirectory(prefix=f"served-{stream.name}-") as tmp:
        try:
            return feed(stream, suite, rate, events, Path(tmp), extra)
        finally:
            logs.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(tmp) / "daemon.log", logs / f"served-{suite.name}-{stream.name}.log")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.served", description=__doc__)
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--rate", type=float, default=20.0, help="events per second fed")
    parser.add_argument("--events", type=int, default=0, help="events per stream (default: the whole stream)")
    parser.add_argument("--streams", default="", help="comma-separated stream names (default: the suite's)")
    parser.add_argument(
        "--jsonl", type=Path, action="append", default=[], help="a stream from a JSON Lines file of text and label"
    )
    parser.add_argument("--no-compare", action="store_true", help="skip the trainer's and river's prequential runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a dynft setting of the daemons (JSON value)"
    )
    parser.add_argument("--tag", default="", help="suffix of the result files (served-<suite>-<tag>.md)")
    args = parser.parse_args()
    extra = {key: json.loads(value) for key, _, value in (item.partition("=") for item in args.set)}
    suite = SUITES[args.suite]
    names = [n for n in args.streams.split(",") if n] or ([] if args.jsonl else list(suite.streams))
    streams = [build(name, suite.sizes, DATA) for name in names] + [from_jsonl(path) for path in args.jsonl]
    results: dict[str, Any] = {"suite": suite.name, "rate": args.rate, "streams": {}}
    results["machine"] = f"{os.cpu_count()}-core CPU, load {os.getloadavg()[0]:.1f} at the start"
    for stream in streams:
        name = stream.name
        events = min(args.events or len(stream.events), len(stream.events))
        served = serve(stream, suite, args.rate, events, args.out / "logs", extra)
        results["streams"][name] = score(stream, suite, served, events, not args.no_compare)
        print(f"{name}: {json.dumps(results['streams'][name])}", file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.quality.served " + " ".join(sys.argv[1:])
    stem = f"served-{suite.name}" + (f"-{args.tag}" if args.tag else "")
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    (args.out / f"{stem}.md").write_text(markdown(results, command), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
