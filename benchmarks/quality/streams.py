"""The four drifting streams of the quality benchmark, built from the files in ``data/``.

Each stream is a list of labeled texts in arrival order, cut into phases; a drift point is
where a phase starts. Every phase has a test slice of texts that are never streamed, labeled
by the concept of that phase, to measure what a model still knows at the end (forgetting).

- ``domain``: sentiment on SST-2 movie reviews, then airline tweets, then movie-review sentences
  of MR (negative vs positive): one binary stream whose domain shifts twice, the second time
  back to the first domain (until 2026-12-05 MR came second, but SST-2 is MR's own sentences,
  so that drift point was no change of domain at all).
- ``airline``: airline tweets in real time order (negative/neutral/positive); the label mix
  moves from day to day (the negative share goes from about 0.56 to 0.74 and back).
- ``banking``: BANKING77's 77 intents arriving 11 at a time in 7 phases (class-incremental).
- ``concept``: AG News topics; half-way the labels are permuted (real concept drift).
"""

from __future__ import annotations

import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynft.blank import blank

DATA = Path(__file__).parent / "data"
AIRLINE_PHASES = (  # (name, first day, last day), by the tweets' `ts`
    ("Feb 16-20", "2015-02-16", "2015-02-20"),
    ("Feb 21", "2015-02-21", "2015-02-21"),
    ("Feb 22", "2015-02-22", "2015-02-22"),
    ("Feb 23-24", "2015-02-23", "2015-02-24"),
)
PERMUTATION = {"World": "Sports", "Sports": "Business", "Business": "Sci/Tech", "Sci/Tech": "World"}
BANKING_PHASES = 7
SEED = 7

Example = tuple[str, str]  # (text, label)


@dataclass(frozen=True)
class Sizes:
    """How much of each stream a suite uses (events streamed, test rows per phase)."""

    domain_per_phase: int
    domain_test: int
    airline_events: int
    airline_test: int
    banking_per_intent: int
    banking_test_per_intent: int
    concept_events: int
    concept_test: int


@dataclass
class Phase:
    name: str
    start: int  # stream index of its first event
    test: list[Example]


@dataclass
class Stream:
    name: str
    kind: str
    events: list[Example]
    phases: list[Phase]

    @property
    def drift_points(self) -> list[int]:
        return [p.start for p in self.phases[1:]]

    def phase_end(self, i: int) -> int:
        """Stream index one past the last event of phase ``i``."""
        return self.phases[i + 1].start if i + 1 < len(self.phases) else len(self.events)

    def event_id(self, index: int) -> str:
        return f"{self.name}-{index:06d}"


def index_of(event_id: str) -> int:
    return int(event_id.rsplit("-", 1)[1])


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def pairs(rows: list[dict[str, Any]]) -> list[Example]:
    return [(r["text"], r["label"]) for r in rows]


def assemble(name: str, kind: str, parts: list[tuple[str, list[Example], list[Example]]]) -> Stream:
    """A stream from consecutive phases given as (name, events, test slice)."""
    events: list[Example] = []
    phases = []
    for phase_name, phase_events, test in parts:
        phases.append(Phase(phase_name, len(events), test))
        events.extend(phase_events)
    return Stream(name, kind, events, phases)


def domain(sizes: Sizes, data: Path = DATA) -> Stream:
    """Movie reviews (SST-2), airline tweets, movie reviews again (MR sentences that SST-2 lacks).

    SST-2 is built from MR's sentences (re-tokenised: "it 's", "is n't"): 724 of the 1,000 rows
    of ``data/sst2/train.jsonl`` are, letter for letter, sentences of the whole MR corpus (its
    10,662). The two are one domain, so they are phases 1 and 3, and MR contributes only
    sentences whose letters differ from every SST-2 row here.
    """
    n, t = sizes.domain_per_phase, sizes.domain_test
    sst2 = {letters(r["text"]) for split in ("train", "test") for r in read(data / "sst2" / f"{split}.jsonl")}

    def mr(split: str) -> list[Example]:
        return pairs([r for r in read(data / "mr" / f"{split}.jsonl") if letters(r["text"]) not in sst2])

    parts = [
        ("SST-2", pairs(read(data / "sst2" / "train.jsonl")[:n]), pairs(read(data / "sst2" / "test.jsonl")[:t])),
        (
            "airline tweets",
            pairs(read(data / "airline" / "posneg-train.jsonl")[:n]),
            pairs(read(data / "airline" / "posneg-test.jsonl")[:t]),
        ),
        ("MR", mr("train")[:n], mr("test")[:t]),
    ]
    return assemble("domain", "domain shift", parts)


def letters(text: str) -> str:
    """``text``'s letters and digits, lower-cased: MR and SST-2 differ in spacing ("is n't")."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


def airline(sizes: Sizes, data: Path = DATA) -> Stream:
    rows = read(data / "airline" / "stream.jsonl")
    rows = evenly(rows, sizes.airline_events)  # time order kept
    tests = read(data / "airline" / "test.jsonl")
    parts = []
    for name, first, last in AIRLINE_PHASES:
        phase = [r for r in rows if first <= r["ts"][:10] <= last]
        test = [r for r in tests if first <= r["ts"][:10] <= last][: sizes.airline_test]
        parts.append((name, pairs(phase), pairs(test)))
    return assemble("airline", "label-mix drift (time order)", parts)


def banking(sizes: Sizes, data: Path = DATA) -> Stream:
    train, test = read(data / "banking77" / "train.jsonl"), read(data / "banking77" / "test.jsonl")
    intents = sorted({r["label"] for r in train})
    rng = random.Random(SEED)
    rng.shuffle(intents)
    per_phase = len(intents) // BANKING_PHASES
    parts = []
    for i in range(BANKING_PHASES):
        group = set(intents[i * per_phase : (i + 1) * per_phase if i < BANKING_PHASES - 1 else None])
        phase = first_per_label([r for r in train if r["label"] in group], sizes.banking_per_intent)
        rng.shuffle(phase)
        slice_ = first_per_label([r for r in test if r["label"] in group], sizes.banking_test_per_intent)
        parts.append((f"intents {i + 1}", pairs(phase), pairs(slice_)))
    return assemble("banking", "class-incremental", parts)


def evenly(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """``n`` rows evenly spaced over ``rows``, in order."""
    n = min(n, len(rows))
    return [rows[i * len(rows) // n] for i in range(n)]


def first_per_label(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    taken: dict[str, int] = {}
    out = []
    for row in rows:
        if taken.get(row["label"], 0) < n:
            taken[row["label"]] = taken.get(row["label"], 0) + 1
            out.append(row)
    return out


def concept(sizes: Sizes, data: Path = DATA) -> Stream:
    n, t = sizes.concept_events, sizes.concept_test
    train, test = pairs(read(data / "ag_news" / "train.jsonl")[:n]), pairs(read(data / "ag_news" / "test.jsonl"))
    half = n // 2

    def permuted(rows: list[Example]) -> list[Example]:
        return [(text, PERMUTATION[label]) for text, label in rows]

    parts = [
        ("topics", train[:half], test[:t]),
        ("topics, labels permuted", permuted(train[half:]), permuted(test[t : 2 * t])),
    ]
    return assemble("concept", "concept drift (label permutation)", parts)


BUILDERS = {"domain": domain, "airline": airline, "banking": banking, "concept": concept}


def build(name: str, sizes: Sizes, data: Path = DATA) -> Stream:
    return BUILDERS[name](sizes, data)


class StreamFileError(ValueError):
    """A ``--jsonl`` file that cannot make a stream: the message names the file and the line."""


def from_jsonl(
    path: Path,
    test_share: float = 0.1,
    max_test: int = 200,
    name: str | None = None,
    max_text_chars: int = 8192,
    max_label_chars: int = 128,
) -> Stream:
    """A one-phase stream from any JSON Lines file of ``{"text", "label"}`` rows, in file order
    (another dataset, as a user would stream it); its last rows (``test_share``, at most
    ``max_test``) are the phase's test slice and are not streamed.

    A label may be a string or an integer (as many datasets write them). Rows the daemon would
    dead-letter (an empty or blank text, a missing, null or empty label, either over its limit:
    the daemon's ``events`` settings) are left out with a note on stderr: the stream measures
    learning, not the input rules. Anything else that is no such row (not JSON, not an object) is a ``StreamFileError``.
    """
    examples: list[Example] = []
    skipped: dict[str, list[int]] = {}
    for n, row in _rows(path):
        why = _unusable(row, max_text_chars, max_label_chars)
        if why is not None:
            skipped.setdefault(why, []).append(n)
            continue
        examples.append((row["text"], str(row["label"])))
    for why, lines in skipped.items():
        shown = ", ".join(map(str, lines[:5])) + (" ..." if len(lines) > 5 else "")
        print(f"{path}: left out {len(lines)} row(s) with {why} (line {shown})", file=sys.stderr)
    test = min(max_test, int(len(examples) * test_share))
    if len(examples) - test < 2:
        raise StreamFileError(f"{path}: {len(examples)} usable rows are too few for a stream")
    return assemble(
        name or path.stem,
        f"JSON Lines file {path.name}",
        [(name or path.stem, examples[: len(examples) - test], examples[len(examples) - test :])],
    )


def _rows(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed row) of each non-blank line; a byte order mark is allowed."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise StreamFileError(f"{path}: cannot be read as UTF-8 text ({exc})") from exc
    rows = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028 and the like
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise StreamFileError(f"{path}, line {n}: not JSON ({getattr(exc, 'msg', exc)})") from exc
        if not isinstance(row, dict) or "text" not in row:
            raise StreamFileError(f"{path}, line {n}: not an object with text and label")
        rows.append((n, row))
    return rows


def _unusable(row: dict[str, Any], max_text_chars: int, max_label_chars: int) -> str | None:
    """Why the daemon would refuse ``row``'s text or label, or None."""
    text, label = row.get("text"), row.get("label")
    if not isinstance(text, str) or blank(text):
        return "no text (missing, not a string, or blank)"
    if len(text) > max_text_chars:
        return f"a text over {max_text_chars} characters"
    if isinstance(label, bool) or not isinstance(label, str | int) or blank(str(label)):
        return "no label (missing, null, or not a string or integer)"
    if len(str(label)) > max_label_chars:
        return f"a label over {max_label_chars} characters"
    return None
