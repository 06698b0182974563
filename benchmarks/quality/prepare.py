"""Make the subsampled data files of the quality benchmark from the full datasets (run once).

``python -m benchmarks.quality.prepare [--source DIR]`` reads the JSON Lines datasets of
``shared/datasets`` (each with a README naming its source and license) and writes
``benchmarks/quality/data/<name>/`` with the rows the full suite uses (the quick suite takes
a subset of the same files), and a README beside each with the source, the license and how
the rows were chosen. Every choice is deterministic, so the files can be remade exactly.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.quality.streams import AIRLINE_PHASES, DATA, evenly

SEED = 20260601
# dataset -> (train rows, test rows), first rows of the (already shuffled) source files
FIRST_ROWS = {
    "sst2": (1000, 400),
    "mr": (1000, 400),
    "subj": (1000, 400),
    "trec6": (1000, 400),
    "emotion": (1000, 400),
    "ag_news": (1800, 400),
}
BANKING_PER_INTENT = (20, 10)
AIRLINE_STREAM, AIRLINE_SLICE, AIRLINE_POSNEG = 1800, 100, (300, 100)  # posneg: per class, train and test


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def provenance(source_readme: Path) -> str:
    """The title, Source and License sections of a dataset README, verbatim."""
    text = source_readme.read_text(encoding="utf-8")
    title = text.splitlines()[2] if len(text.splitlines()) > 2 else ""
    sections = re.findall(r"(## (?:Source|License)\n.*?)(?=\n## |\Z)", text, flags=re.S)
    return title + "\n\n" + "\n\n".join(s.strip() for s in sections)


TEACHER_SECTION = "## Teacher predictions"  # a README's part that preparing the data again keeps


def readme(name: str, source: Path, files: dict[str, int], how: str) -> None:
    listing = "\n".join(f"- `{f}`: {n} rows" for f, n in files.items())
    body = (
        f"# {name} (subsample for the quality benchmark)\n\n{provenance(source / 'README.md')}\n\n"
        f"## Subsample\n\n{how}\n\n{listing}\n\n"
        f"Made by `python -m benchmarks.quality.prepare` from the JSON Lines copy in `shared/datasets/{source.name}/` "
        "(its README describes the conversion from the source). Texts and labels are unchanged.\n"
    )
    path = DATA / name / "README.md"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if (at := old.find(TEACHER_SECTION)) >= 0:  # written by hand beside benchmarks.quality.teacher's file
        body += "\n" + old[at:]
    path.write_text(body, encoding="utf-8")


def first_rows(source: Path, name: str, train_n: int, test_n: int) -> None:
    train, test = read(source / "train.jsonl")[:train_n], read(source / "test.jsonl")[:test_n]
    write(DATA / name / "train.jsonl", train)
    write(DATA / name / "test.jsonl", test)
    how = f"The first {train_n} rows of `train.jsonl` and the first {test_n} of `test.jsonl` (both files are shuffled)."
    readme(name, source, {"train.jsonl": len(train), "test.jsonl": len(test)}, how)


def banking(source: Path) -> None:
    per_train, per_test = BANKING_PER_INTENT
    for split, per in (("train", per_train), ("test", per_test)):
        taken: dict[str, int] = defaultdict(int)
        rows = []
        for row in read(source / f"{split}.jsonl"):
            if taken[row["label"]] < per:
                taken[row["label"]] += 1
                rows.append(row)
        write(DATA / "banking77" / f"{split}.jsonl", rows)
    how = f"The first {per_train} training and {per_test} test rows of each of the 77 intents, in file order."
    readme("banking77", source, {"train.jsonl": 77 * per_train, "test.jsonl": 77 * per_test}, how)


def airline(source: Path) -> None:
    rows = read(source / "train.jsonl") + read(source / "test.jsonl")
    rows.sort(key=lambda r: r["ts"])  # stable: ties keep file order
    stream = evenly(rows, AIRLINE_STREAM)
    streamed = {id(r) for r in stream}
    rest = [r for r in rows if id(r) not in streamed]
    rng = random.Random(SEED)
    by_day: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rest:
        by_day[row["ts"][:10]].append(row)
    slices = []
    for _, first, last in AIRLINE_PHASES:
        pool = [r for day, rs in sorted(by_day.items()) if first <= day <= last for r in rs]
        slices.extend(sorted(rng.sample(pool, AIRLINE_SLICE), key=lambda r: r["ts"]))
    used = streamed | {id(r) for r in slices}
    per_train, per_test = AIRLINE_POSNEG
    posneg: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for label in ("negative", "positive"):
        pool = [r for r in rows if r["label"] == label and id(r) not in used]
        picked = rng.sample(pool, per_train + per_test)
        posneg["train"] += picked[:per_train]
        posneg["test"] += picked[per_train:]
    for split, picked in posneg.items():
        rng.shuffle(picked)
        write(DATA / "airline" / f"posneg-{split}.jsonl", [{"text": r["text"], "label": r["label"]} for r in picked])
    write(DATA / "airline" / "stream.jsonl", stream)
    write(DATA / "airline" / "test.jsonl", slices)
    how = (
        f"All {len(rows)} tweets (train and test, which split at Feb 23) sorted by `ts`; `stream.jsonl` is "
        f"{len(stream)} of them evenly spaced in that order (row `int(i * {len(rows)} / {len(stream)})`, `ts` kept). "
        f"`test.jsonl`: {AIRLINE_SLICE} other tweets "
        "drawn at random from each phase (Feb 16-20, Feb 21, Feb 22, Feb 23-24), sorted by `ts`. `posneg-*.jsonl`: "
        f"a balanced draw of negative and positive tweets ({per_train} + {per_test} per class) from the rest, "
        f"shuffled, neutral left out, `ts` dropped (the third domain of the domain-shift stream). Seed {SEED}."
    )
    files = {"stream.jsonl": len(stream), "test.jsonl": len(slices)}
    files |= {f"posneg-{s}.jsonl": len(p) for s, p in posneg.items()}
    readme("airline", source, files, how)


OVERVIEW = """# Data of the quality benchmark

Subsamples of public text-classification datasets, made by `python -m benchmarks.quality.prepare`
from the JSON Lines copies in `shared/datasets/`. Each folder's README names the source
(repository, commit, path), the license, and how the rows were chosen. The licenses are mostly
research-only or non-commercial: these files are benchmark inputs, not part of the dynft package.

| folder | used by | license (see the folder's README) |
|---|---|---|
| `sst2/` | domain-shift stream (phase 1), fine-tuning comparison | not stated; Stanford SST, research use |
| `mr/` | domain-shift stream (phase 2), fine-tuning comparison | not stated; Cornell movie reviews, research use |
| `airline/` | label-mix stream, domain-shift stream (phase 3) | not stated; Kaggle release CC BY-NC-SA 4.0 |
| `banking77/` | class-incremental stream, distillation (and its teacher) | CC BY 4.0 (PolyAI) |
| `ag_news/` | concept-drift stream, fine-tuning comparison, distillation (+ teacher) | academic, non-commercial |
| `subj/`, `trec6/`, `emotion/` | fine-tuning comparison | not stated; research / educational use |
"""


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.prepare", description=__doc__)
    parser.add_argument("--source", type=Path, default=Path(__file__).parents[3] / "shared" / "datasets")
    source: Path = parser.parse_args().source
    for name, (train_n, test_n) in FIRST_ROWS.items():
        first_rows(source / name, name, train_n, test_n)
    banking(source / "banking77")
    airline(source / "airline_sentiment_temporal")
    (DATA / "README.md").write_text(OVERVIEW, encoding="utf-8")
    print(f"wrote {DATA}")


if __name__ == "__main__":
    main()
