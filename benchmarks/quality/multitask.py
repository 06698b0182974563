"""The ``multitask`` stream: four tasks interleaved in one stream, with a concept drift in one of them.

Tasks, from the datasets in ``data/``: ``sentiment`` (SST-2, 2 labels), ``question`` (TREC-6,
6), ``intents`` (BANKING77, the first ``intents`` intents) and ``topic`` (AG News, 4), whose
labels are permuted half-way through its events (the drift). Each seed shuffles every task's
events and their interleaving. Contenders, each on the same events:

- ``daemon per task``: one dynft daemon (``TrainingLoop``) per task, each on its task's events only;
- ``per_task`` / ``shared``: one daemon on the interleaved stream, ``tasks.sharing`` set so;
- ``flat``: one daemon, no ``task`` field: every task's labels in one softmax (labels prefixed by task);
- ``river per task``: river's TF-IDF + logistic regression, one model per task;
- ``per_task, no drift``: ``per_task`` on the stream without the permutation: what the drift of
  ``topic`` costs the other tasks is the difference of their accuracies.

Reported per task: prequential accuracy (predict, then learn, over the events dynft trains on:
its held-out share, the same 10% of ids for everyone, is skipped by all), mean and spread
(standard deviation) over seeds; CPU seconds per stream event; peak resident memory. A daemon per
task runs in a process of its own, as deployed: its CPU and peak memory are the daemons' summed.
"""

from __future__ import annotations

import json
import random
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from benchmarks.quality.streams import DATA, read
from benchmarks.quality.suites import Suite, dynft_overrides

TASKS = ("sentiment", "question", "intents", "topic")
DRIFTING = "topic"
PERMUTATION = {"World": "Sports", "Sports": "Business", "Business": "Sci/Tech", "Sci/Tech": "World"}
CONTENDERS = ("daemon per task", "per_task", "shared", "flat", "river per task", "per_task, no drift")
SEP = "::"  # flat: a label is "<task>::<label>"

Row = dict[str, str]  # {"id", "text", "label", "task"}


@dataclass(frozen=True)
class Job:
    contender: str
    seed: int


def task_events(per_task: int, intents: int, data: Path = DATA) -> dict[str, list[tuple[str, str]]]:
    """Each task's labeled texts (up to ``per_task``), in the files' order."""
    banking = read(data / "banking77" / "train.jsonl")
    kept = sorted({r["label"] for r in banking})[:intents]
    sources = {
        "sentiment": read(data / "sst2" / "train.jsonl"),
        "question": read(data / "trec6" / "train.jsonl"),
        "intents": [r for r in banking if r["label"] in kept],
        "topic": read(data / "ag_news" / "train.jsonl"),
    }
    return {task: [(r["text"], r["label"]) for r in rows[:per_task]] for task, rows in sources.items()}


def stream(per_task: int, intents: int, seed: int, drift: bool = True, data: Path = DATA) -> list[Row]:
    """The interleaved stream of one seed; ``topic``'s second half is relabelled when ``drift``."""
    rng = random.Random(seed)
    queues: dict[str, list[Row]] = {}
    for task, pairs in task_events(per_task, intents, data).items():
        rng.shuffle(pairs)
        half = len(pairs) // 2
        queues[task] = [
            {
                "id": f"{task}-{i:05d}",
                "text": text,
                "label": PERMUTATION[label] if drift and task == DRIFTING and i >= half else label,
                "task": task,
            }
            for i, (text, label) in enumerate(pairs)
        ]
    out: list[Row] = []
    while any(queues.values()):  # each task keeps its order; which task comes next is random
        task = rng.choice([t for t, q in queues.items() if q])
        out.append(queues[task].pop(0))
    return out


def write_rows(rows: list[Row], path: Path, task_field: bool = True, flat: bool = False) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            out: dict[str, str] = {"id": row["id"], "text": row["text"], "label": row["label"]}
            if flat:
                out["label"] = f"{row['task']}{SEP}{row['label']}"
            elif task_field:
                out["task"] = row["task"]
            fh.write(json.dumps(out) + "\n")
    return path


def run_loop(suite: Suite, rows: list[Row], seed: int, extra: dict[str, Any], **how: bool) -> dict[str, list[bool]]:
    """One daemon over ``rows``; each task's prequential outcomes (right or wrong), in order."""
    from benchmarks.quality.recording import RecordingPrequential
    from dynft.loop import TrainingLoop
    from dynft.settings import load_settings
    from dynft.tasks import Task

    class Recording(TrainingLoop):
        def _task(self, name: str, resume: bool = True) -> Task:
            known = name in self.tasks
            task = super()._task(name, resume)
            if not known:
                task.prequential = RecordingPrequential(self.settings.evaluation.window)
            return task

    with tempfile.TemporaryDirectory(prefix="dynft-multitask-") as tmp:
        path = write_rows(rows, Path(tmp) / "stream.jsonl", **how)
        overrides = dynft_overrides(suite, "dynft") | extra
        overrides |= {"state_dir": f"{tmp}/state", "source.uri": f"file:{path}", "source.exit_at_end": True}
        loop = Recording(load_settings(overrides=overrides | {"trainer.seed": seed}))
        loop.prequential = RecordingPrequential(loop.settings.evaluation.window)
        loop.run()
    logs = {"default": loop.prequential.log} | {
        name: t.prequential.log for name, t in loop.tasks.items() if isinstance(t.prequential, RecordingPrequential)
    }
    outcomes: dict[str, list[bool]] = {}
    for name, log in logs.items():
        for truth, prediction in log:
            task = truth.split(SEP, 1)[0] if how.get("flat") else name
            outcomes.setdefault(task, []).append(truth == prediction)
    return outcomes


def run_river(rows: list[Row]) -> dict[str, list[bool]]:
    from benchmarks.quality.methods import make_river
    from dynft.evaluation import is_held_out
    from dynft.settings import EvaluationSettings

    fraction = EvaluationSettings().holdout_fraction
    models: dict[str, Any] = {}
    outcomes: dict[str, list[bool]] = {}
    for row in rows:
        if is_held_out(row["id"], row["text"], fraction):
            continue  # dynft holds these out for its gate: nobody is scored on them
        model = models.setdefault(row["task"], make_river("river TF-IDF + LR"))
        outcomes.setdefault(row["task"], []).append(model.predict_one(row["text"]) == row["label"])
        model.learn_one(row["text"], row["label"])
    return outcomes


def run_daemon(suite: Suite, rows: list[Row], seed: int) -> tuple[list[bool], float, float]:
    """One daemon of one task, in a process of its own as it would run: its outcomes, CPU seconds
    (from the same point as ``execute``'s) and peak resident MiB."""
    import torch

    torch.set_num_threads(suite.threads)
    cpu = time.process_time()
    outcomes = run_loop(suite, rows, seed, {}, task_field=False)["default"]
    return outcomes, time.process_time() - cpu, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_daemons(
    suite: Suite, rows: list[Row], seed: int, spawn: bool = True
) -> tuple[dict[str, list[bool]], float, float]:
    """A daemon per task, each in its own process (one after another): outcomes, summed CPU seconds
    (each pays its own start: imports, model load) and summed peak MiB (they would run at once).
    Not ``spawn``: all in this process (the smoke test's shortcut; figures then mean little)."""
    from benchmarks.quality.harness import quiet

    own = [[r for r in rows if r["task"] == task] for task in TASKS]
    if spawn:
        ctx = get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=ctx, initializer=quiet, max_tasks_per_child=1) as pool:
            parts = list(pool.map(run_daemon, [suite] * len(TASKS), own, [seed] * len(TASKS)))
    else:
        parts = [run_daemon(suite, part, seed) for part in own]
    outcomes = {task: part[0] for task, part in zip(TASKS, parts, strict=True)}
    return outcomes, sum(part[1] for part in parts), sum(part[2] for part in parts)


def execute(job: Job, suite: Suite, data: Path = DATA, spawn: bool = True) -> dict[str, Any]:
    import torch

    torch.set_num_threads(suite.threads)
    size = suite.multitask_per_task, suite.multitask_intents
    rows = stream(*size, job.seed, drift=job.contender != "per_task, no drift", data=data)
    if job.contender == "daemon per task":
        outcomes, seconds, peak_mib = run_daemons(suite, rows, job.seed, spawn)
    else:
        cpu = time.process_time()
        if job.contender == "river per task":
            outcomes = run_river(rows)
        elif job.contender == "flat":
            outcomes = run_loop(suite, rows, job.seed, {}, flat=True)
        else:
            sharing = "shared" if job.contender == "shared" else "per_task"
            outcomes = run_loop(suite, rows, job.seed, {"tasks.sharing": sharing})
        seconds = time.process_time() - cpu
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "contender": job.contender,
        "seed": job.seed,
        "accuracy": {t: sum(o) / len(o) for t, o in outcomes.items() if o},
        "scored": {t: len(o) for t, o in outcomes.items()},
        "events": len(rows),
        "cpu_s_per_event": seconds / len(rows),
        "peak_rss_mib": peak_mib,
    }


def run_multitask(
    suite: Suite,
    seeds: int,
    workers: int,
    data: Path = DATA,
    first_seed: int = 0,
    contenders: tuple[str, ...] = CONTENDERS,
) -> dict[str, Any]:
    """Every contender on every seed; each job in a fresh process (its peak memory is its own).
    ``workers=0``: every job in this process, one after another (the smoke test's shortcut: each
    job's peak memory then includes the earlier ones', and its CPU the imports of the first)."""
    from benchmarks.quality.harness import quiet

    jobs = [Job(c, seed) for seed in range(first_seed, first_seed + seeds) for c in contenders]
    started = time.time()
    if workers < 1:
        rows = [execute(job, suite, data, spawn=False) for job in jobs]
    else:
        ctx = get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=quiet, max_tasks_per_child=1) as pool:
            rows = list(pool.map(execute, jobs, [suite] * len(jobs), [data] * len(jobs)))
    return {
        "suite": suite.name,
        "seeds": seeds,
        "workers": workers,
        "seconds": round(time.time() - started, 1),
        "per_task": suite.multitask_per_task,
        "intents": suite.multitask_intents,
        "runs": rows,
        "summary": summarize(rows),
    }


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for contender in CONTENDERS:
        runs = [r for r in rows if r["contender"] == contender]
        if not runs:
            continue
        out[contender] = {
            "accuracy": {t: spread([r["accuracy"].get(t, 0.0) for r in runs]) for t in TASKS},
            "cpu_s_per_event": spread([r["cpu_s_per_event"] for r in runs]),
            "peak_rss_mib": spread([r["peak_rss_mib"] for r in runs]),
        }
    return out


def markdown(results: dict[str, Any], command: str) -> str:
    s = results["summary"]
    lines = [
        f"# Multitask stream: {results['suite']} suite",
        "",
        f"`{command}`: {results['seeds']} seed(s), {results['per_task']} events per task "
        f"({results['intents']} BANKING77 intents), {results['workers']} worker(s), {results['seconds']} s.",
        f"The `{DRIFTING}` task's labels are permuted half-way through its events. Accuracy: prequential, "
        "% (mean ± standard deviation over seeds).",
        "",
        f"| contender | {' | '.join(TASKS)} | mean | CPU s/event | peak RSS MiB |",
        "|---|" + "---|" * (len(TASKS) + 3),
    ]
    for contender, row in s.items():
        accs = [f"{100 * m:.1f} ± {100 * sd:.1f}" for m, sd in (row["accuracy"][t] for t in TASKS)]
        mean = statistics.fmean(row["accuracy"][t][0] for t in TASKS)
        cpu, rss = row["cpu_s_per_event"][0], row["peak_rss_mib"][0]
        lines.append(f"| {contender} | {' | '.join(accs)} | {100 * mean:.1f} | {cpu:.4f} | {rss:.0f} |")
    if "per_task" in s and "per_task, no drift" in s:
        costs = [
            f"{t} {100 * (s['per_task, no drift']['accuracy'][t][0] - s['per_task']['accuracy'][t][0]):+.1f}"
            for t in TASKS
            if t != DRIFTING
        ]
        what = f"What the drift of `{DRIFTING}` costs the other tasks in `per_task` (points: without it minus with it)"
        lines += ["", f"{what}: {', '.join(costs)}."]
    lines += [
        "",
        "`daemon per task` runs each daemon in a process of its own, as it would be deployed: its CPU "
        "is theirs summed (each pays its own start: imports, model load) and its peak RSS their peaks summed "
        "(they would run at once).",
    ]
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out: Path, command: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    name = f"multitask-{results['suite']}"
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    md_path.write_text(markdown(results, command))
    return [json_path, md_path]


def main() -> int:
    import argparse
    import os

    from benchmarks.quality.__main__ import RESULTS
    from benchmarks.quality.suites import SUITES

    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.multitask", description=__doc__)
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--workers", type=int, default=min(2, os.cpu_count() or 1), help="parallel jobs, each a process; 0: in this one"
    )
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", choices=CONTENDERS, default=list(CONTENDERS), help="these contenders only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--merge", type=Path, nargs="*", help="combine these results (runs of other seeds); no run")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = f"python -m benchmarks.quality.multitask {' '.join(sys.argv[1:])}".strip()
    if args.merge:
        parts = [json.loads(path.read_text()) for path in args.merge]
        runs = [run for part in parts for run in part["runs"]]
        seconds = round(sum(part["seconds"] for part in parts), 1)
        results = parts[0] | {"runs": runs, "seeds": len({r["seed"] for r in runs}), "seconds": seconds}
        results["summary"] = summarize(runs)
    else:
        suite = SUITES[args.suite]
        results = run_multitask(
            suite, args.seeds, args.workers, first_seed=args.first_seed, contenders=tuple(args.only)
        )
    for path in write(results, args.out, command):
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
