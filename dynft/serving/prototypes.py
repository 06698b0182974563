"""The fast path for new labels: class prototypes in the co-located server.

Users are answered by the serving version, which knows a new label only a publish after the
label's first events: on a class-incremental stream, seconds of wrong answers at every phase.
The fast path closes that gap without waiting for a version. The trainer hands the first
``server.prototype_shots`` labelled events of every label of the default task to the server
through an append-only file, ``<state_dir>/run/shots.jsonl`` (``ShotLog``). The server embeds
the shots of each label that the answering version lacks with that very version (the feature
its head reads, so prototype and query live in one space; rows an earlier version embedded are
renewed a few per forward, see ``FastPath._prototypes``) and answers with the version's head
extended by one row per such label, imprinted from the label's mean feature exactly as the
trainer imprints a new label's row (``OnlineTrainer._imprint``: the centred mean, scaled to the
norm and bias of the established rows). Once a version that knows the label serves, no row is
made for it: the prototype retires by itself. Unless the version barely knows it: while the
version's ``label_events`` (fresh events its lineage trained per label) count fewer events of a
label than the fast path holds shots of it, the label's prototype row replaces the version's
own row, which rests on fewer examples (measured: on a class-incremental stream such early rows
answered their labels worse than the prototypes they retired). A prototype row says how alike a
text is to a label's shots, not how common the label is: each adds the log of its label's recent
rate, which the trainer writes beside the shots (``dynft.serving.labelmix``).

Shots carry the default task's lineage: after a drift reaction that reset the head or the
adapter (a confirmed concept change, say) the trainer collects shots afresh and the server drops
the older ones, which would answer with the old concept. Shots are numbered as versions are
(the publisher's lineage), so the server tells an older version from a current one: until a
version of the new lineage serves, the old one's rows (the old concept) give way to prototype
rows of every label with new shots; the new lineage's first versions, which barely know their
labels, are helped by the new concept's first events as above.

Before any version serves, a *version 0* answers: the base encoder with a fresh (identity)
adapter, and prototype rows alone. Without shots nothing answers (503), as before.

Ownership: ``ShotLog`` is written by the trainer's batching thread only. ``FastPath.poll`` runs
on the server's watcher thread and hands new shots to the worker through a queue; everything
else of ``FastPath`` (shots, features, the centre) is the worker's, which runs every forward.
Crash safety: the file is the whole state. A restarted trainer counts its shots from it; a
restarted server reads it from the start. A line cut by a crash is dropped by both.
"""

from __future__ import annotations

import json
import logging
import queue
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dynft.events import Event
from dynft.imprint import imprint_rows
from dynft.serving.labelmix import MIX_FILE, LabelMix, LabelRates, read_rates

log = logging.getLogger(__name__)

SHOTS_FILE = Path("run") / "shots.jsonl"  # under the state directory
CENTRE_DECAY = 0.99  # the centre follows about the last 100 rows the server embedded
REFRESH_ROWS = 16  # shot rows of an earlier version re-embedded per forward (``FastPath._prototypes``)

Embed = Callable[[list[str]], torch.Tensor]  # texts -> (B, H) features the head reads, under one version


@dataclass(frozen=True)
class Shot:
    label: str
    text: str
    lineage: int = 1  # the default task's lineage when it was offered (lines without one: the first)


def read_shots(path: Path, offset: int = 0) -> tuple[list[Shot], int]:
    """The whole lines of ``path`` from byte ``offset``, and the offset after the last of them.

    A line that does not parse (cut by a crash, or written by hand) is skipped with a warning.
    """
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], 0
    end = data.rfind(b"\n") + 1  # a last line without its newline is still being written
    shots = []
    for line in data[:end].splitlines():
        try:
            row = json.loads(line)
            shots.append(Shot(str(row["label"]), str(row["text"]), int(row.get("lineage", 1))))
        except (ValueError, KeyError, TypeError):
            log.warning("skipping an unreadable line of %s", path)
    return shots, offset + end


class ShotLog:
    """The trainer's side: appends the first ``per_label`` events of each label to the shots file."""

    def __init__(self, path: Path, per_label: int) -> None:
        self.path = path
        self.per_label = per_label
        path.parent.mkdir(parents=True, exist_ok=True)
        shots, end = read_shots(path)
        if path.exists() and path.stat().st_size > end:  # a line cut by a crash: appending would glue onto it
            with open(path, "r+b") as fh:
                fh.truncate(end)
        self.lineage = max((shot.lineage for shot in shots), default=1)
        self.counts: Counter[str] = Counter(shot.label for shot in shots if shot.lineage == self.lineage)
        self.mix = LabelMix(path.parent / MIX_FILE.name, self.lineage)  # every event's label, for the rows' prior

    def offer(self, events: Iterable[Event], lineage: int = 1) -> int:
        """Append the events whose label still lacks shots in ``lineage``; returns how many were written.

        A new lineage (a drift reaction reset the head or the adapter) collects its shots afresh:
        after a concept change the old shots answer the old concept.
        The fast path is an optimisation: a write the disk refuses is logged and its shots are
        offered again by the label's next events, and training goes on.
        """
        if lineage != self.lineage:
            self.lineage, self.counts = lineage, Counter()
            self.mix.reset(lineage)
        taken: Counter[str] = Counter()
        lines = []
        for event in events:
            self.mix.add(event.label)
            if self.counts[event.label] + taken[event.label] < self.per_label:
                taken[event.label] += 1
                row = {"label": event.label, "text": event.text, "lineage": lineage}
                lines.append(json.dumps(row) + "\n")
        self.mix.write()
        if not lines:
            return 0
        try:
            # One write of whole lines, flushed at once: the server sees them at its next poll.
            # No fsync: shots lost with the page cache only delay the fast path, never corrupt it.
            with open(self.path, "a", encoding="utf-8") as fh:
                start = fh.tell()
                try:
                    fh.write("".join(lines))
                    fh.flush()
                except OSError:  # a part written to a full disk would glue onto the next line
                    fh.truncate(start)
                    raise
        except OSError as exc:
            log.warning("cannot hand %d shots to the server's fast path (%s): %s", len(lines), self.path, exc)
            return 0
        self.counts.update(taken)
        return len(lines)

    def idle(self) -> None:
        """Nothing new was taken: the label mix's last events reach the file once its throttle allows."""
        self.mix.write()


@dataclass
class _Embedded:
    """Shot features of the pending labels (the worker's), each row tagged with the generation of
    the version that embedded it: a new version makes the others stale, not void (see ``_prototypes``)."""

    version: object | None = None  # the LoadedVersion of the current generation (compared by identity)
    generation: int = 0
    features: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # label -> one (H,) row per shot
    made: dict[str, list[int]] = field(default_factory=dict)  # label -> the generation of each row
    renewing: bool = False  # rows of an earlier generation may be left (none are looked for otherwise)


class FastPath:
    """Prototype rows for the labels a version lacks; see the module's docstring."""

    def __init__(self, path: Path, per_label: int) -> None:
        self.path = path
        self.per_label = per_label
        self._offset = 0  # watcher thread only
        self._mix_stamp: tuple[int, int, int] | None = None  # the label mix file's last read (watcher thread)
        # Shots, the label mix's rates, or None: start over.
        self._inbox: queue.SimpleQueue[list[Shot] | LabelRates | None] = queue.SimpleQueue()
        self.rates: LabelRates | None = None  # the newest lineage's (worker thread only)
        self.shots: dict[str, list[str]] = {}  # label -> texts (worker thread only)
        self.lineage = 0  # the lineage of ``shots``: only the newest one's are kept (worker thread only)
        self._embedded = _Embedded()
        self._centre: torch.Tensor | None = None  # running mean of embedded rows (H,)
        self.has_shots = False  # set by the watcher after handing shots over, read to build version 0

    # -- watcher thread --------------------------------------------------------------------

    def poll(self) -> None:
        """Hand the shots appended since the last poll, and a changed label mix, to the worker (watcher thread)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size < self._offset:  # the file was replaced (state reset): start over
            self._offset, self._mix_stamp = 0, None  # the new trainer's mix is read again after the reset
            self._inbox.put(None)
        shots, self._offset = read_shots(self.path, self._offset)
        if shots:
            self._inbox.put(shots)
            self.has_shots = True
        self._poll_mix()

    def _poll_mix(self) -> None:
        """Hand the label mix to the worker when its file changed; a file gone takes its rates along."""
        path = self.path.parent / MIX_FILE.name
        try:
            stat = path.stat()
        except FileNotFoundError:
            if self._mix_stamp is not None:
                self._mix_stamp = None
                self._inbox.put(LabelRates(0, {}))
            return
        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)  # each write is a rename: a new inode
        if stamp != self._mix_stamp:
            self._mix_stamp = stamp
            self._inbox.put(read_rates(path) or LabelRates(0, {}))  # a malformed one: no prior (said in the log)

    # -- worker thread ---------------------------------------------------------------------

    def take(self) -> None:
        """Adopt what the watcher handed over (worker thread, between batches)."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is None:
                self.shots, self._embedded, self.lineage, self.rates = {}, _Embedded(), 0, None
                continue
            if isinstance(item, LabelRates):
                self.rates = item
                continue
            for shot in item:
                if shot.lineage < self.lineage:  # an old concept's: its answers would be the old ones
                    continue
                if shot.lineage > self.lineage:
                    self.shots, self._embedded, self.lineage = {}, _Embedded(), shot.lineage
                texts = self.shots.setdefault(shot.label, [])
                if len(texts) < self.per_label:
                    texts.append(shot.text)

    def pending(self, known: list[str], trained: Any = None, lineage: Any = None) -> list[str]:
        """Labels with shots that a version knowing ``known`` lacks, or (``trained``: its events
        per label, from its metadata) knows from fewer events than the label has shots here.

        A version of an older ``lineage`` than the shots' (a drift reaction reset the head since,
        and no version of the new lineage serves yet) knows every label of the shots by the old
        concept: each of them is pending, and its prototype row replaces the version's own.
        """
        if _count(lineage, default=self.lineage) < self.lineage:
            return list(self.shots)
        have = set(known)
        counts = trained if isinstance(trained, dict) else {}
        return [
            label
            for label, texts in self.shots.items()
            if label not in have or _count(counts.get(label), default=len(texts)) < len(texts)
        ]

    def observe(self, features: torch.Tensor) -> None:
        """Fold embedded rows (B, H) into the centre: what every text shares says nothing of its label."""
        mean = features.float().mean(dim=0)
        if self._centre is None or self._centre.shape != mean.shape:
            self._centre = mean
            return
        weight = CENTRE_DECAY ** features.shape[0]
        self._centre = weight * self._centre + (1 - weight) * mean

    def extend(
        self,
        version: object,
        known: list[str],
        head: torch.nn.Linear,
        features: torch.Tensor,
        embed: Embed,
        trained: Any = None,
        lineage: Any = None,
    ) -> tuple[list[str], torch.Tensor | None]:
        """The pending labels and their logits (B, P) for the rows ``features`` (B, H), or ([], None).

        ``head`` is the version's output layer over ``known`` (rows beyond them are ignored);
        ``embed`` embeds texts with that version; ``trained`` and ``lineage`` are its metadata's
        (see ``pending``).
        """
        pending = self.pending(known, trained, lineage)
        if not pending:
            return [], None
        prototypes = self._prototypes(version, pending, embed)  # (P, H)
        centre = self._centre if self._centre is not None else prototypes.mean(dim=0)
        weight, bias = imprint_rows(prototypes, centre, head, len(known), features)  # as the trainer imprints
        logits = features.float() @ weight.T + bias  # (B, P)
        prior = self.prior(pending, known)
        return pending, logits if prior is None else logits + torch.tensor(prior, device=logits.device)

    def prior(self, pending: list[str], known: list[str]) -> list[float] | None:
        """The pending labels' log recent rates against the mean over every label answered with, or
        None: a prototype row weighs how alike, not how common (``dynft.serving.labelmix``)."""
        rates = self.rates
        if rates is None or rates.lineage != self.lineage or not rates.rates:  # an older concept's, or none
            return None
        return rates.prior(pending, list(dict.fromkeys([*known, *pending])))

    def _prototypes(self, version: object, pending: list[str], embed: Embed) -> torch.Tensor:
        """Each pending label's mean shot feature (P, H), embedded by ``version`` as far as a forward allows.

        New shots are embedded at once. Rows a previous version embedded are re-embedded at most
        ``REFRESH_ROWS`` per forward, oldest first, and used meanwhile: consecutive versions differ
        by a few adapter steps, so their features hardly move, while re-embedding every shot of every
        pending label at each version (hundreds of texts on a class-incremental stream, with a new
        version every second) stalled the answers of a 2-core server for about a second each.
        """
        cache = self._embedded
        if cache.version is not version:
            cache.version, cache.generation, cache.renewing = version, cache.generation + 1, True
        new = [
            (label, i) for label in pending for i in range(len(cache.features.get(label, [])), len(self.shots[label]))
        ]
        stale = [
            (label, i)
            for label in (pending if cache.renewing else [])  # the predict path: no scan once all are renewed
            for i, made in enumerate(cache.made.get(label, []))
            if made != cache.generation
        ]
        cache.renewing = len(stale) > REFRESH_ROWS
        todo = new + stale[:REFRESH_ROWS]
        if todo:
            features = embed([self.shots[label][i] for label, i in todo]).float()
            self.observe(features)
            for (label, i), row in zip(todo, features, strict=True):
                rows, made = cache.features.setdefault(label, []), cache.made.setdefault(label, [])
                if i < len(rows):
                    rows[i], made[i] = row, cache.generation
                else:
                    rows.append(row)
                    made.append(cache.generation)
        return torch.stack([torch.stack(cache.features[label]).mean(dim=0) for label in pending])


def _count(value: Any, default: int) -> int:
    """A count from a version's metadata; anything else (an older version, a bad value) counts as ``default``."""
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def merge_columns(
    labels: list[str], logits: torch.Tensor, extra: list[str], more: torch.Tensor
) -> tuple[list[str], torch.Tensor]:
    """The version's columns with prototype columns (B, P) for ``extra``: a label the version knows
    has its column replaced, the others are appended."""
    index = {label: i for i, label in enumerate(labels)}
    logits = logits.clone()
    new = []
    for j, label in enumerate(extra):
        if label in index:
            logits[:, index[label]] = more[:, j]
        else:
            new.append(j)
    return [*labels, *(extra[j] for j in new)], torch.cat([logits, more[:, new]], dim=1)
