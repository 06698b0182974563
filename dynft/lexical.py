"""Word counts beside the adapter: a multinomial naive Bayes over hashed words, served blended with it.

Why: the adapter reads a text's first ``model.max_length`` tokens and needs many examples before
its head is sure of a label; word counts read every word and are useful after a few examples.
On long news texts (``python -m benchmarks.quality.served --jsonl``, four AG News articles per
event) river's naive Bayes was right 97% of the time where the served adapter was right 88%;
on the short sentiment streams a blend of the two, computed offline from the trainer's own
prequential probabilities, gained one to two points over the adapter alone.

The trainer owns a ``Lexicon`` (``trainer.lexical``): before learning each fresh event it scores
the adapter's probability of the event's label and the counts', and keeps, for each mixing
weight of a small grid, a discounted log loss of the mixture (follow the leader over the grid).
The weight with the lowest loss is the blend's; ties go to the adapter alone, so a stream where
the counts do not help is answered as without them. Every version carries the counts and the
weight (``lexical.safetensors``, part of its content hash), so what the server blends is what
was published, a replica gets it with the version, and a checkpoint restores it exactly.

>>> lex = Lexicon(buckets=1024)
>>> lex.learn(["a great film", "an awful film", "great acting"], [0, 1, 0], labels=2)
>>> [round(p, 2) for p in lex.probabilities(["great"], 2)[0].tolist()]
[0.84, 0.16]
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from collections.abc import Sequence

import torch

WORD = re.compile(r"(?u)\b\w\w+\b")  # words of two or more characters, lower-cased (as river's BagOfWords)
WEIGHTS = torch.linspace(1.0, 0.0, 11)  # the adapter's share; the first (adapter alone) wins ties
DECAY = 0.99  # per event: the blend follows the last few hundred events
ALPHA = 1.0  # additive smoothing of word counts


def bag(text: str, buckets: int) -> Counter[int]:
    """The text's words hashed into ``buckets`` (crc32: the same in every process, unlike ``hash``)."""
    return Counter(zlib.crc32(word.encode("utf-8", "surrogatepass")) % buckets for word in WORD.findall(text.lower()))


class Lexicon:
    """Word counts per label (dense, ``labels x buckets``), events per label, and the blend's losses.

    Owned by one trainer (its training thread); the server builds a read-only copy per version
    with ``from_state``.
    """

    def __init__(self, buckets: int) -> None:
        self.buckets = buckets
        self.counts = torch.zeros(0, buckets)  # (C, B) word counts
        self.docs = torch.zeros(0)  # (C,) events per label
        self.losses = torch.zeros(len(WEIGHTS))  # discounted log loss of each mixing weight

    @property
    def weight(self) -> float:
        """The adapter's share of the blend now."""
        return float(WEIGHTS[int(torch.argmin(self.losses))])

    def _grow(self, labels: int) -> None:
        if labels > self.counts.shape[0]:
            more = labels - self.counts.shape[0]
            self.counts = torch.cat([self.counts, torch.zeros(more, self.buckets)])
            self.docs = torch.cat([self.docs, torch.zeros(more)])

    def learn(self, texts: Sequence[str], label_ids: Sequence[int], labels: int) -> None:
        self._grow(labels)
        for text, label in zip(texts, label_ids, strict=True):
            words = bag(text, self.buckets)
            if words:
                self.counts[label, list(words)] += torch.tensor(list(words.values()), dtype=torch.float32)
            self.docs[label] += 1

    def probabilities(self, texts: Sequence[str], labels: int) -> torch.Tensor:
        """P(label | words) for the first ``labels`` labels (N, labels); a label without events gets 0."""
        self._grow(labels)
        return posterior(self.counts[:labels], self.docs[:labels], [bag(t, self.buckets) for t in texts])

    def weigh(self, adapter: torch.Tensor, counts: torch.Tensor, label_ids: Sequence[int]) -> None:
        """Score each mixing weight on events the adapter (``adapter``, N x C) and the counts
        (``counts``, N x C) predicted before learning them; only labels both knew take part."""
        for a_row, c_row, label in zip(adapter, counts, label_ids, strict=True):
            if label >= a_row.shape[0] or not float(a_row[label]) > 0.0 or not float(c_row.sum()) > 0.0:
                continue  # a label new to either (or no label known): its loss says nothing about the blend
            mixed = WEIGHTS * float(a_row[label]) + (1 - WEIGHTS) * float(c_row[label])
            self.losses = DECAY * self.losses - torch.log(mixed.clamp_min(1e-6))

    def reset(self) -> None:
        """Forget everything (a new lineage: the labels may mean something else now)."""
        self.counts, self.docs = torch.zeros(0, self.buckets), torch.zeros(0)
        self.losses = torch.zeros(len(WEIGHTS))

    def state(self, labels: int) -> dict[str, torch.Tensor]:
        """The counts of the first ``labels`` labels, sparse (most buckets are empty), and the losses."""
        self._grow(labels)
        counts = self.counts[:labels]
        where = counts.nonzero()  # (K, 2)
        return {
            "lexical.index": where.to(torch.int64).contiguous(),
            "lexical.count": counts[where[:, 0], where[:, 1]].contiguous(),
            "lexical.docs": self.docs[:labels].clone(),
            "lexical.losses": self.losses.clone(),
            "lexical.buckets": torch.tensor([self.buckets], dtype=torch.int64),
        }

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Continue from a ``state`` (of this many buckets); raises ``ValueError`` and changes nothing on a misfit."""
        loaded = Lexicon.from_state(tensors)
        if loaded.buckets != self.buckets:
            raise ValueError(f"lexical counts of {loaded.buckets} buckets, expected {self.buckets}")
        self.counts, self.docs, self.losses = loaded.counts, loaded.docs, loaded.losses

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor]) -> Lexicon:
        """Raises ``ValueError`` naming what is wrong with a malformed state."""
        try:
            buckets = int(tensors["lexical.buckets"][0])
            index, count = tensors["lexical.index"].long(), tensors["lexical.count"].float()
            docs, losses = tensors["lexical.docs"].float(), tensors["lexical.losses"].float()
        except (KeyError, IndexError) as exc:
            raise ValueError(f"lexical counts are incomplete (missing {exc})") from exc
        fits = index.dim() == 2 and index.shape[1] == 2 and count.shape == index.shape[:1] and buckets > 0
        if not fits or losses.shape != WEIGHTS.shape or docs.dim() != 1:
            raise ValueError("lexical counts have malformed shapes")
        if index.numel() and (int(index[:, 0].max()) >= docs.shape[0] or int(index[:, 1].max()) >= buckets):
            raise ValueError("lexical counts index past their labels or buckets")
        if not all(bool(torch.isfinite(t).all()) for t in (count, docs, losses)):
            raise ValueError("lexical counts have non-finite values")
        lexicon = cls(buckets)
        lexicon.counts = torch.zeros(docs.shape[0], buckets)
        lexicon.counts[index[:, 0], index[:, 1]] = count
        lexicon.docs, lexicon.losses = docs, losses
        return lexicon


class WordScorer:
    """A version's word counts as the server reads them: log probabilities computed once, read-only."""

    def __init__(self, lexicon: Lexicon, labels: int) -> None:
        lexicon._grow(labels)
        self.weight = lexicon.weight
        self.buckets = lexicon.buckets
        self.table, self.prior = _tables(lexicon.counts[:labels], lexicon.docs[:labels])

    def probabilities(self, texts: Sequence[str]) -> torch.Tensor:
        return _score(self.table, self.prior, [bag(t, self.buckets) for t in texts])


def posterior(counts: torch.Tensor, docs: torch.Tensor, bags: Sequence[Counter[int]]) -> torch.Tensor:
    """Multinomial naive Bayes: P(label | words) (N, C), smoothed over the buckets seen; 0 for labels
    without events, and a row of zeros where no label has any."""
    table, prior = _tables(counts, docs)
    return _score(table, prior, bags)


def _tables(counts: torch.Tensor, docs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log P(bucket | label) (C, B) and log P(label) (C,), -inf for labels without events."""
    vocabulary = max(1, int((counts.sum(0) > 0).sum()))
    table = torch.log(counts + ALPHA) - torch.log(counts.sum(1, keepdim=True) + ALPHA * vocabulary)
    prior = torch.log(docs / docs.sum().clamp_min(1.0)) if docs.numel() else docs  # log 0 = -inf: no events
    return table, prior


def _score(table: torch.Tensor, prior: torch.Tensor, bags: Sequence[Counter[int]]) -> torch.Tensor:
    out = torch.zeros(len(bags), table.shape[0])
    if not bool(torch.isfinite(prior).any()):
        return out
    for row, words in enumerate(bags):
        index = torch.tensor(list(words), dtype=torch.int64)
        times = torch.tensor(list(words.values()), dtype=torch.float32)
        out[row] = torch.softmax(prior + table[:, index] @ times if words else prior, dim=0)
    return out


def blend(adapter: torch.Tensor, counts: torch.Tensor, weight: float) -> torch.Tensor:
    """The served mixture (N, C): ``weight`` of the adapter's probabilities; rows the counts cannot
    score (no label has events) stay the adapter's."""
    if weight >= 1.0:
        return adapter
    known = counts.sum(-1, keepdim=True) > 0
    return torch.where(known, weight * adapter + (1 - weight) * counts, adapter)
