"""The model-size x fine-tuning experiment's merged table and plot.

``python -m benchmarks.quality.paradigms report --inputs A.json B.json [--out PREFIX]``

Merges the rows that ``python -m benchmarks.quality.paradigms`` saved (one file per model, or a
run cut short: every file holds the rows measured so far) into ``PREFIX.md`` and ``PREFIX.png``:

- per model and configuration, averaged over the datasets that every (model, configuration)
  has: test accuracy (batch view: one pass, then scored on held-out test rows) and prequential
  accuracy (stream view: each batch predicted before it is learned), each as the mean over
  seeds with its spread (sample standard deviation over seeds of the dataset average), trainable
  parameters, size on disk and CPU seconds per training example;
- per model, configuration and dataset, the same figures;
- the plot: accuracy against CPU seconds per example, one point per model and configuration
  (filled: test accuracy, hollow: prequential), error bars over seeds.

The same row read twice (a file given twice, or two runs of one seed) counts once: the last
file wins.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

Row = dict[str, Any]
KEY = ("model", "config", "dataset", "seed")
CONFIG_ORDER = ("head only", "LoRA r=2", "LoRA r=8", "LoRA r=32", "full fine-tuning")


def merge(records: list[dict[str, Any]]) -> list[Row]:
    """The rows of every record, one per (model, configuration, dataset, seed), in first-seen order."""
    rows: dict[tuple[Any, ...], Row] = {}
    for record in records:
        for row in record["rows"]:
            rows[tuple(row[k] for k in KEY)] = row
    return list(rows.values())


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """The mean, and the sample standard deviation (None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def ordered(keys: set[tuple[str, str]]) -> list[tuple[str, str]]:
    rank = {c: i for i, c in enumerate(CONFIG_ORDER)}
    return sorted(keys, key=lambda mc: (mc[0], rank.get(mc[1], len(rank)), mc[1]))


def common_datasets(rows: list[Row]) -> list[str]:
    """The datasets that every (model, configuration) has at least one row of, in first-seen order."""
    have: dict[tuple[str, str], set[str]] = {}
    for r in rows:
        have.setdefault((r["model"], r["config"]), set()).add(r["dataset"])
    shared = set.intersection(*have.values()) if have else set()
    return [d for d in dict.fromkeys(r["dataset"] for r in rows) if d in shared]


def summary(rows: list[Row]) -> list[dict[str, Any]]:
    """Per (model, configuration): figures averaged over the common datasets, spread over seeds.

    A seed's dataset average is taken only where that seed has every common dataset, so that a
    seed cut short does not move the mean by leaving out a hard dataset.
    """
    datasets = common_datasets(rows)
    out = []
    for model, config in ordered({(r["model"], r["config"]) for r in rows}):
        mine = [r for r in rows if (r["model"], r["config"]) == (model, config) and r["dataset"] in datasets]
        by_seed: dict[Any, dict[str, Row]] = {}
        for r in mine:
            by_seed.setdefault(r["seed"], {})[r["dataset"]] = r
        complete = [seed_rows for seed_rows in by_seed.values() if len(seed_rows) == len(datasets)]
        if not complete:
            continue
        stats: dict[str, Any] = {"model": model, "config": config, "seeds": len(complete), "datasets": datasets}
        for key in ("test_accuracy", "prequential_accuracy", "cpu_seconds_per_example"):
            per_seed = [statistics.fmean(r[key] for r in seed_rows.values()) for seed_rows in complete]
            stats[key], stats[key + "_sd"] = mean_sd(per_seed)
        stats["trainable_params"] = max(r["trainable_params"] for r in mine)  # the head grows with the labels
        stats["saved_bytes"] = max(r["saved_bytes"] for r in mine)
        out.append(stats)
    return out


def per_dataset(rows: list[Row]) -> list[dict[str, Any]]:
    """Per (model, configuration, dataset): means and spreads over seeds."""
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["config"], r["dataset"]), []).append(r)
    rank = {c: i for i, c in enumerate(CONFIG_ORDER)}
    out = []
    for (model, config, dataset), group in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][2], rank.get(kv[0][1], 9))
    ):
        stats: dict[str, Any] = {"model": model, "config": config, "dataset": dataset, "seeds": len(group)}
        for key in ("test_accuracy", "prequential_accuracy", "cpu_seconds_per_example"):
            stats[key], stats[key + "_sd"] = mean_sd([r[key] for r in group])
        stats["trainable_params"] = max(r["trainable_params"] for r in group)
        stats["saved_bytes"] = max(r["saved_bytes"] for r in group)
        out.append(stats)
    return out


def pct(mean: float, sd: float | None) -> str:
    return f"{100 * mean:.1f}" + ("" if sd is None else f" ± {100 * sd:.1f}")


def size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def markdown(rows: list[Row], command: str, sources: list[str], png: str) -> str:
    datasets = common_datasets(rows)
    train = sorted({r["train_events"] for r in rows})
    test = sorted({r["test_events"] for r in rows})
    lines = [
        "# Model size x fine-tuning configuration",
        "",
        f"`{command}`, merging {', '.join(f'`{s}`' for s in sources)} ({len(rows)} runs).",
        "",
        f"Each run: one pass over {'/'.join(map(str, train))} training examples of a dataset in batches of 16, "
        f"scored on {'/'.join(map(str, test))} test rows. Accuracies in %, mean ± sample standard deviation "
        "over seeds (no ± with one seed). *test*: the batch view (held-out test rows after the pass); "
        "*prequential*: the stream view (each batch predicted before it is learned). CPU s / example: the "
        "training pass's CPU time over its examples (not inflated by waits for a busy core, but a loaded "
        "machine still slows it through shared caches).",
        "",
        f"## Averaged over {', '.join(datasets) or 'no dataset common to all'}",
        "",
        f"![accuracy against CPU seconds per example]({png})",
        "",
        "| model | configuration | seeds | test acc. | prequential acc. | trainable | on disk | CPU s / example |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary(rows):
        lines.append(
            f"| {s['model']} | {s['config']} | {s['seeds']} | {pct(s['test_accuracy'], s['test_accuracy_sd'])} | "
            f"{pct(s['prequential_accuracy'], s['prequential_accuracy_sd'])} | {s['trainable_params']:,} | "
            f"{size(s['saved_bytes'])} | {s['cpu_seconds_per_example']:.3f} |"
        )
    lines += [
        "",
        "## Per dataset",
        "",
        "| model | dataset | configuration | seeds | test acc. | prequential acc. | trainable | on disk "
        "| CPU s / example |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in per_dataset(rows):
        lines.append(
            f"| {s['model']} | {s['dataset']} | {s['config']} | {s['seeds']} | "
            f"{pct(s['test_accuracy'], s['test_accuracy_sd'])} | "
            f"{pct(s['prequential_accuracy'], s['prequential_accuracy_sd'])} | {s['trainable_params']:,} | "
            f"{size(s['saved_bytes'])} | {s['cpu_seconds_per_example']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path) -> None:
    """Accuracy against CPU seconds per example (log scale), one point per model and configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summary(rows)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    models = list(dict.fromkeys(s["model"] for s in stats))
    markers = dict(zip(CONFIG_ORDER, "os^Dv", strict=True))
    for colour, model in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], models, strict=False):
        mine = [s for s in stats if s["model"] == model]
        for s in mine:
            x = s["cpu_seconds_per_example"]
            marker = markers.get(s["config"], "o")
            for key, face in (("test_accuracy", colour), ("prequential_accuracy", "none")):
                sd = s[key + "_sd"]
                ax.errorbar(
                    x,
                    s[key],
                    yerr=sd if sd is not None else None,
                    fmt=marker,
                    color=colour,
                    markerfacecolor=face,
                    markersize=8,
                    capsize=3,
                )
            ax.annotate(s["config"], (x, s["test_accuracy"]), textcoords="offset points", xytext=(6, 4), fontsize=7)
        ax.plot(
            [s["cpu_seconds_per_example"] for s in mine],
            [s["test_accuracy"] for s in mine],
            color=colour,
            alpha=0.35,
            linewidth=1,
            label=f"{model} ({mine[0]['seeds']} seed(s))",
        )
    ax.set_xscale("log")
    ax.set_xlabel("training CPU seconds per example (log scale)")
    ax.set_ylabel("accuracy (filled: test, hollow: prequential)")
    datasets = ", ".join(common_datasets(rows))
    ax.set_title(f"Model size x fine-tuning configuration, mean over {datasets}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(inputs: list[Path], out: Path, command: str) -> list[Path]:
    """Merge the JSON files ``inputs`` into ``out``.md and ``out``.png (and ``out``.json, the merged rows)."""
    records = [json.loads(p.read_text(encoding="utf-8")) for p in inputs]
    rows = merge(records)
    if not rows:
        raise ValueError(f"no rows in {', '.join(map(str, inputs))}")
    out.parent.mkdir(parents=True, exist_ok=True)
    png, md, merged = out.with_suffix(".png"), out.with_suffix(".md"), out.with_suffix(".json")
    plot(rows, png)
    md.write_text(markdown(rows, command, [p.name for p in inputs], png.name), encoding="utf-8")
    merged.write_text(json.dumps({"inputs": [str(p) for p in inputs], "rows": rows}, indent=1) + "\n")
    return [md, png, merged]
