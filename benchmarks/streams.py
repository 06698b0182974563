"""Event streams for the benchmarks, built from the packaged demo data (BANKING77, 12 intents)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from dynft.evaluation import is_held_out
from dynft.sources.demo import load_demo_rows


def held_out_ids(events: list[dict[str, Any]], fraction: float, prefix: str = "h") -> list[str]:
    """An id for each of ``events`` with which dynft routes it to its held-out window (never trained on)."""
    out: list[str] = []
    i = 0
    for event in events:
        while not is_held_out(f"{prefix}{i}", event["text"], fraction):
            i += 1
        out.append(f"{prefix}{i}")
        i += 1
    return out


def long_events(n: int, min_words: int, seed: int = 0, prefix: str = "t") -> list[dict[str, Any]]:
    """``n`` events whose texts join demo texts of one intent until they have ``min_words`` words.

    A word is at least one token, so every text fills ``min_words`` tokens: batches of these
    texts have the same length whether padded to the longest text or to a fixed length.
    """
    by_label: dict[str, list[str]] = {}
    for row in load_demo_rows():
        by_label.setdefault(row["label"], []).append(row["text"])
    labels = sorted(by_label)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = rng.choice(labels)
        parts: list[str] = []
        words = 0
        while words < min_words:
            text = rng.choice(by_label[label])
            parts.append(text)
            words += len(text.split())
        out.append({"id": f"{prefix}{i}", "text": " ".join(parts), "label": label})
    return out


def demo_events(n: int, seed: int = 0, prefix: str = "e") -> list[dict[str, Any]]:
    """``n`` demo events in a shuffled order (texts as they are: short, varied lengths)."""
    rows = load_demo_rows()
    rng = random.Random(seed)
    return [{"id": f"{prefix}{i}", **rows[rng.randrange(len(rows))]} for i in range(n)]


def with_ids(events: list[dict[str, Any]], ids: list[str]) -> list[dict[str, Any]]:
    return [{**e, "id": i} for e, i in zip(events, ids, strict=False)]


def write_jsonl(path: Path, events: list[dict[str, Any]]) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for event in events:
            fh.write(json.dumps(event) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
