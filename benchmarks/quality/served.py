"""Served accuracy: what users of a running daemon are answered, not what its trainer predicted.

``python -m benchmarks.quality.served --suite quick [--rate 20] [--events N] [--streams a,b] [--jsonl F ...]``

``--jsonl F`` (repeatable) adds a stream from any JSON Lines file of ``{"text", "label"}`` rows,
in file order (``streams.from_jsonl``): another dataset, fed as a user would stream it. Rows the
daemon would dead-letter (a blank text, no label, over the ``events`` limits) are left out with a
note; a file that is not JSON Lines, a bad ``--set`` or an unknown stream is an error before any
daemon starts. Files of one name get their folder's name too (``emotion-train``). Results are
written after each stream, and a stream that fails is reported as such beside the others. Beside
served accuracy: the majority baseline (the label seen most often before each event).

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
import itertools
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

from benchmarks.quality.args import count, positive
from benchmarks.quality.harness import quiet
from benchmarks.quality.methods import RIVER_METHODS, run_method
from benchmarks.quality.streams import BUILDERS, DATA, Stream, StreamFileError, build, from_jsonl
from benchmarks.quality.suites import SUITES, Suite, dynft_overrides
from dynft.settings import Settings

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
    part, for ``text``; (None, None, [], False) when it refuses (503: nothing to answer with yet;
    4xx: a text it does not take, said on stderr)."""
    body = json.dumps({"texts": [text]}).encode()
    request = urllib.request.Request(f"{base}/v1/predict", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 503:
            return None, None, [], False
        if 400 <= exc.code < 500:  # a text the server refuses (its limits may be set otherwise than the file's check)
            print(f"the server refused a text: {exc.code} {exc.read()[:300]!r}", file=sys.stderr)
            return None, None, [], False
        raise
    best = answer["predictions"][0]
    fast = bool(answer.get("fast_path", False))
    return str(best["label"]), int(answer["adapter_version"]), list(best["scores"]), fast


def wait_for_http(base: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            said = "\n  ".join(tail) or "(nothing)"
            code = process.returncode
            raise RuntimeError(f"dynft run exited with {code} before its server answered; its log:\n  {said}")
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
        wait_for_http(base, process, workdir / "daemon.log")
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


def accuracy(truths: list[str], answers: list[str | None]) -> float | None:
    """The share of right answers; None for no events (nothing was scored, which is not 0%)."""
    if not truths:
        return None
    return sum(a == t for a, t in zip(answers, truths, strict=True)) / len(truths)


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def majority(truths: list[str]) -> float | None:
    """Prequential accuracy of answering the label seen most often so far (none before the first):
    what a served accuracy must beat to mean anything on a skewed stream."""
    counts: dict[str, int] = {}
    right = 0
    for truth in truths:
        if counts and max(counts, key=lambda label: counts[label]) == truth:
            right += 1
        counts[truth] = counts.get(truth, 0) + 1
    return right / len(truths) if truths else None


def rolling(truths: list[str], answers: list[str | None], window: int, every: int) -> list[tuple[int, float]]:
    """(event index, accuracy of the answers to the last ``window`` events), every ``every`` events."""
    hits = [a == t for a, t in zip(answers, truths, strict=True)]
    out = []
    for i in range(min(window, len(hits)) - 1, len(hits)):
        if i % every == 0 or i == len(hits) - 1:
            start = max(0, i + 1 - window)
            out.append((i, round(sum(hits[start : i + 1]) / (i + 1 - start), 4)))
    return out


def on_positions(truths: list[str], answers: list[str | None], positions: list[int]) -> float | None:
    """Served accuracy on the events at ``positions`` only (those the trainer scored)."""
    return accuracy([truths[i] for i in positions], [answers[i] for i in positions])


def score(stream: Stream, suite: Suite, served: dict[str, Any], events: int, compare: bool) -> dict[str, Any]:
    truths = [label for _, label in stream.events[:events]]
    answers = served["answers"]
    cuts = [events * k // 4 for k in range(5)]  # four quarters, whatever the count
    out: dict[str, Any] = {
        "events": events,
        "served_accuracy": rounded(accuracy(truths, answers)),
        "majority_baseline": rounded(majority(truths)),
        "served_by_quarter": [
            rounded(accuracy(truths[a:b], answers[a:b])) for a, b in itertools.pairwise(cuts) if b > a
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
            out[f"{method} prequential"] = rounded(accuracy([truths[i] for i in same], [on[i] for i in same]))
            if method == "dynft":
                out["served on dynft's events"] = rounded(on_positions(truths, answers, same))
    return out


def markdown(results: dict[str, Any], command: str) -> str:
    rows = results["streams"]
    columns = sorted({k for r in rows.values() for k in r if k.endswith("prequential") or k.startswith("served on")})
    header = ["stream", "events", "served", "majority", "by quarter", "unanswered", "first answer at", "versions"]
    header += ["version knew the label", "served when it knew", "fast path answers", *columns]
    lines = [
        f"# Served accuracy, {results['suite']} suite",
        "",
        f"`{command}` — {results['rate']} events/s, {results['machine']}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:200]} |" + " |" * (len(header) - 2))
            continue
        cells = [name, str(r["events"]), fraction(r["served_accuracy"]), fraction(r.get("majority_baseline"))]
        cells += [" / ".join(fraction(q) for q in r["served_by_quarter"]), str(r["unanswered"])]
        cells += [str(r["first_answered_at"]), str(r["versions_seen"]), fraction(r.get("answered_knowing_label"))]
        cells += [fraction(r.get("served_accuracy_when_known")), str(r.get("fast_path_answers", 0))]
        cells += [fraction(r.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", MAJORITY_NOTE, "", KNEW_NOTE]
    return "\n".join(lines) + "\n"


MAJORITY_NOTE = (
    "*majority*: the accuracy of answering, for each event, the label seen most often before it: on a skewed "
    "stream, what any served accuracy must beat to mean something. A dash: nothing to score."
)
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


def settings_of(parser: argparse.ArgumentParser, items: list[str]) -> tuple[dict[str, Any], Settings]:
    """``--set`` values (JSON where they parse), checked as the daemons would check them, before any
    daemon starts: a mistake is one line here, not a daemon that exits or ignores it."""
    from dynft.errors import ConfigError
    from dynft.settings import load_settings
    from dynft.settings.files import parse_assignment

    try:
        extra = dict(parse_assignment(item) for item in items)
        unknown = [key for key in extra if key.split(".")[0] not in Settings.model_fields]
        if unknown:
            parser.error(f"--set {unknown[0]}: no such setting (see `dynft config --reference`)")
        return extra, load_settings(overrides=extra)
    except ConfigError as exc:
        parser.error(f"--set: {exc}")


def stream_names(paths: list[Path], taken: list[str] | None = None) -> list[str]:
    """A name per ``--jsonl`` file: its stem, or with its folder where stems repeat (``emotion-train``)
    or name a suite stream run beside it (``taken``)."""
    stems = [p.stem for p in paths] + (taken or [])
    names = [f"{p.parent.name}-{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]
    names += taken or []
    return [name if names.count(name) == 1 else f"{name}-{i + 1}" for i, name in enumerate(names[: len(paths)])]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.served", description=__doc__)
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--rate", type=positive, default=20.0, help="events per second fed")
    parser.add_argument("--events", type=count, default=0, help="events per stream (default: the whole stream)")
    parser.add_argument(
        "--streams", default="", help=f"comma-separated stream names of the suite (default: all: {', '.join(BUILDERS)})"
    )
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
    quiet()  # the comparison's in-process models: no transformers notices about their new heads
    extra, settings = settings_of(parser, args.set)
    suite = SUITES[args.suite]
    names = [n for n in args.streams.split(",") if n] or ([] if args.jsonl else list(suite.streams))
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        parser.error(
            f"--streams {unknown[0]}: no such stream (the suite's are {', '.join(BUILDERS)}; --jsonl FILE for others)"
        )
    try:  # every file is checked before the first daemon starts
        limits = settings.events
        streams = [build(name, suite.sizes, DATA) for name in names] + [
            from_jsonl(path, name=name, max_text_chars=limits.max_text_chars, max_label_chars=limits.max_label_chars)
            for path, name in zip(args.jsonl, stream_names(args.jsonl, names), strict=True)
        ]
    except StreamFileError as exc:
        parser.error(str(exc))
    results: dict[str, Any] = {"suite": suite.name, "rate": args.rate, "streams": {}}
    results["machine"] = f"{os.cpu_count()}-core CPU, load {os.getloadavg()[0]:.1f} at the start"
    command = "python -m benchmarks.quality.served " + " ".join(sys.argv[1:])
    stem = f"served-{suite.name}" + (f"-{args.tag}" if args.tag else "")
    for stream in streams:
        name = stream.name
        events = min(args.events or len(stream.events), len(stream.events))
        try:
            served = serve(stream, suite, args.rate, events, args.out / "logs", extra)
            results["streams"][name] = score(stream, suite, served, events, not args.no_compare)
        except Exception as exc:  # one stream's failure costs none of the others' results
            results["streams"][name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"{name}: {json.dumps(results['streams'][name])}", file=sys.stderr, flush=True)
        write(args.out, stem, results, command)  # after each stream: a later failure or ^C loses nothing
    return 1 if any("error" in r for r in results["streams"].values()) else 0


def write(out: Path, stem: str, results: dict[str, Any], command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    (out / f"{stem}.md").write_text(markdown(results, command), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
