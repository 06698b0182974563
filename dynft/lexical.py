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
from collections.abc import Callable, Mapping, Sequence

import torch

WORD = re.compile(r"(?u)\b\w\w+\b")  # words of two or more characters, lower-cased (as river's BagOfWords)
WEIGHTS = torch.linspace(1.0, 0.0, 11)  # the adapter's share; the first (adapter alone) wins ties
DECAY = 0.99  # per event: the blend follows the last few hundred events
ALPHA = 1.0  # additive smoothing of word counts
MAX_BUCKETS = 1 << 20  # trainer.lexical_buckets' bound: a state claiming more is refused, not allocated


def bag(text: str, buckets: int) -> Counter[int]:
    """The text's words hashed into ``buckets`` (crc32: the same in every process, unlike ``hash``)."""
    return Counter(zlib.crc32(word.encode("utf-8", "surrogatepass")) % buckets for word in WORD.findall(text.lower()))


class Bags:
    """The bags of words of ``texts``, flattened: bucket, count and text of every entry."""

    def __init__(self, texts: Sequence[str], buckets: int) -> None:
        index: list[int] = []
        count: list[int] = []
        owner: list[int] = []
        for n, text in enumerate(texts):
            words = bag(text, buckets)
            index += words.keys()
            count += words.values()
            owner += [n] * len(words)
        self.texts = len(texts)
        self.index = torch.tensor(index, dtype=torch.int64)  # (K,)
        self.count = torch.tensor(count, dtype=torch.float32)  # (K,)
        self.owner = torch.tensor(owner, dtype=torch.int64)  # (K,)


class Lexicon:
    """Word counts per label (dense, ``labels x buckets``), events per label, and the blend's losses.

    Owned by one trainer (its training thread); the server reads a version's through ``WordScorer``.
    """

    def __init__(self, buckets: int) -> None:
        self.buckets = buckets
        self.counts = torch.zeros(0, buckets)  # (C, B) word counts: the first C rows of _rows
        self._rows: torch.Tensor | None = None  # spare rows for new labels (see _grow)
        self.totals = torch.zeros(0)  # (C,) words per label: counts.sum(1), kept as the counts grow
        self.docs = torch.zeros(0)  # (C,) events per label
        self.seen = torch.zeros(buckets, dtype=torch.bool)  # buckets with any word: the smoothing's vocabulary
        self.losses = torch.zeros(len(WEIGHTS))  # discounted log loss of each mixing weight

    @property
    def weight(self) -> float:
        """The adapter's share of the blend now."""
        return _weight(self.losses)

    def _grow(self, labels: int) -> None:
        """Rows for ``labels`` labels. The counts are a view of a matrix with spare rows that grows
        by half when full: a stream of new labels copies it a few dozen times in all, not once per
        label (at 1,000 labels and the default buckets it holds 128 MiB)."""
        have = self.counts.shape[0]
        if labels <= have:
            return
        rows = self._rows
        if rows is None or rows.data_ptr() != self.counts.data_ptr() or labels > rows.shape[0]:
            rows = torch.zeros(max(labels, have + have // 2), self.buckets)  # counts replaced whole: a new matrix
            rows[:have] = self.counts
            self._rows = rows
        self.counts = rows[:labels]
        more = labels - have
        self.totals = torch.cat([self.totals, torch.zeros(more)])
        self.docs = torch.cat([self.docs, torch.zeros(more)])

    def observe(
        self,
        texts: Sequence[str],
        label_ids: Sequence[int | None],
        labels: int,
        adapter: torch.Tensor,
        soft: Mapping[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Test, then train on fresh events: score the blend's weights on what the adapter
        (``adapter``, N x C, before learning them) and the counts predicted, then count the words
        of the events with a label (``None``: not counted). An event in ``soft`` (its row: a
        distribution over the ``labels``, a teacher's) is scored against its label and counted
        by that distribution, each label getting its share of every word. Returns the counts'
        predictions (N x labels)."""
        soft = soft or {}
        bags = Bags(texts, self.buckets)
        self._grow(labels)
        posterior = self._posterior(bags, labels)
        ids = {i: label for i, label in enumerate(label_ids) if label is not None}
        if ids:
            rows = list(ids)
            self.weigh(adapter[rows], posterior[rows], list(ids.values()))
            hard = [i for i in rows if i not in soft]
            if hard:
                self._learn(Bags([texts[i] for i in hard], self.buckets), [ids[i] for i in hard])
            spread = [i for i in rows if i in soft]
            if spread:
                self._learn_soft(Bags([texts[i] for i in spread], self.buckets), torch.stack([soft[i] for i in spread]))
        return posterior

    def learn(self, texts: Sequence[str], label_ids: Sequence[int], labels: int) -> None:
        self._grow(labels)
        self._learn(Bags(texts, self.buckets), label_ids)

    def _learn(self, bags: Bags, label_ids: Sequence[int]) -> None:
        ids = torch.tensor(list(label_ids), dtype=torch.int64)
        rows = ids[bags.owner]
        self.counts.index_put_((rows, bags.index), bags.count, accumulate=True)
        self.totals.index_add_(0, rows, bags.count)
        self.docs.index_add_(0, ids, torch.ones(len(ids)))
        self.seen[bags.index] = True

    def _learn_soft(self, bags: Bags, shares: torch.Tensor) -> None:
        """Count each text's words under every label by the text's share of it (``shares``, N x C)."""
        labels = shares.shape[1]
        words = shares[bags.owner] * bags.count[:, None]  # (K, C): a word's count split over the labels
        self.counts[:labels].index_add_(1, bags.index, words.T)
        self.totals[:labels] += words.sum(0)
        self.docs[:labels] += shares.sum(0)
        self.seen[bags.index] = True

    def probabilities(self, texts: Sequence[str], labels: int) -> torch.Tensor:
        """P(label | words) for the first ``labels`` labels (N, labels); a label without events gets 0."""
        self._grow(labels)
        return self._posterior(Bags(texts, self.buckets), labels)

    def _posterior(self, bags: Bags, labels: int) -> torch.Tensor:
        columns = _columns(self.counts[:labels, bags.index], _denominator(self.totals[:labels], int(self.seen.sum())))
        return _score(columns, _log_prior(self.docs[:labels]), bags)

    def weigh(self, adapter: torch.Tensor, counts: torch.Tensor, label_ids: Sequence[int]) -> None:
        """Score each mixing weight on events the adapter (``adapter``, N x C) and the counts
        (``counts``, N x C) predicted before learning them; only labels both knew take part."""
        ids = torch.tensor(list(label_ids), dtype=torch.int64)
        inside = ids < adapter.shape[1]
        rows = torch.arange(len(ids))
        a = torch.zeros(len(ids))
        a[inside] = adapter[rows[inside], ids[inside]].float()
        c = counts[rows, ids.clamp_max(counts.shape[1] - 1)] if counts.shape[1] else torch.zeros(len(ids))
        # A label new to either (or none known yet: NaN) says nothing about the blend. NaN > 0 is False.
        usable = inside & (a > 0) & (counts.sum(1) > 0)
        a, c = a[usable], c[usable]
        if not len(a):
            return
        mixed = WEIGHTS[None, :] * a[:, None] + (1 - WEIGHTS[None, :]) * c[:, None]  # (n, grid)
        discount = DECAY ** torch.arange(len(a) - 1, -1, -1, dtype=torch.float32)  # the newest counts most
        self.losses = DECAY ** len(a) * self.losses - (discount[:, None] * torch.log(mixed.clamp_min(1e-6))).sum(0)

    def reset(self) -> None:
        """Forget everything (a new lineage: the labels may mean something else now)."""
        self.__dict__.update(Lexicon(self.buckets).__dict__)

    def state(self, labels: int) -> dict[str, torch.Tensor]:
        """The counts of the first ``labels`` labels and the losses. The counts go sparse (12 bytes
        per word of a label) while most buckets are empty, dense (4 bytes per bucket) after: a
        version's counts stay under 128 KiB per label at the default 32,768 buckets."""
        self._grow(labels)
        counts = self.counts[:labels]
        # (K, 2) rows of (label, bucket), stored by bucket, then label, as a load reads them (sorted
        # here: counts.T.nonzero() walks the matrix column by column, 5x slower at 1,000 labels).
        where = counts.nonzero()
        where = where[torch.argsort(where[:, 1] * labels + where[:, 0])]
        out = {
            "lexical.docs": self.docs[:labels].clone(),
            "lexical.losses": self.losses.clone(),
            "lexical.buckets": torch.tensor([self.buckets], dtype=torch.int64),
        }
        if 3 * where.shape[0] >= counts.numel():
            return out | {"lexical.counts": counts.clone()}
        sparse = {"lexical.index": where.to(torch.int32), "lexical.count": counts[where[:, 0], where[:, 1]]}
        return out | {k: t.contiguous() for k, t in sparse.items()}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], labels: int) -> Lexicon:
        """A copy of a ``state`` of at most ``labels`` labels; raises ``ValueError`` naming what is
        wrong with a malformed one (checked before anything of its size is allocated)."""
        checked = _CheckedState(tensors, labels)
        lexicon = cls(checked.buckets)
        lexicon.counts, lexicon.docs, lexicon.losses = checked.dense(), checked.docs, checked.losses
        lexicon.totals, lexicon.seen = checked.totals, checked.seen()
        return lexicon


class _CheckedState:
    """A ``Lexicon.state``'s parts, checked on the form it is stored in: a sparse state's values
    are checked before the dense matrix is built, so a check costs its entries, not its buckets."""

    def __init__(self, tensors: dict[str, torch.Tensor], labels: int) -> None:
        try:
            self.buckets = buckets = int(_integers(tensors["lexical.buckets"])[0])
            self.docs = docs = tensors["lexical.docs"].float().clone()
            self.losses = tensors["lexical.losses"].float().clone()
            if docs.dim() != 1 or docs.shape[0] > labels:
                raise ValueError(f"lexical counts of {docs.shape[0]} labels, expected at most {labels}")
            if not 0 < buckets <= MAX_BUCKETS:
                raise ValueError(f"lexical counts of {buckets} buckets (at most {MAX_BUCKETS})")
            self.matrix: torch.Tensor | None = None
            if "lexical.counts" in tensors:
                self.matrix = values = tensors["lexical.counts"].float().clone()
                if values.shape != (docs.shape[0], buckets):
                    raise ValueError("lexical counts have malformed shapes")
                self.totals = values.sum(1)
            else:
                self.index, values, self.order = self._sparse(tensors, docs.shape[0], buckets)
                self.values = values
                self.totals = torch.zeros(docs.shape[0]).index_add_(0, self.index[:, 0], values)
        except (KeyError, IndexError) as exc:
            raise ValueError(f"lexical counts are incomplete (missing {exc})") from exc
        except (TypeError, RuntimeError) as exc:  # torch's word for tensors of unusable types or shapes
            raise ValueError(f"lexical counts are malformed ({type(exc).__name__}: {exc})") from exc
        if self.losses.shape != WEIGHTS.shape:
            raise ValueError("lexical counts have malformed shapes")
        # Few passes (a version loads on the server's hot-swap path): the small parts in one. Sums of
        # finite values can still be infinite, so the totals and the events' sum are checked too.
        # A finite sum of everything says every value is finite; the element-wise check only if not.
        small = torch.cat([docs, self.losses, self.totals, docs.sum()[None]])
        if not bool((values.sum() + small.sum()).isfinite()) and not (
            bool(torch.isfinite(values).all()) and bool(torch.isfinite(small).all())
        ):
            raise ValueError("lexical counts have non-finite values")
        if bool((values < 0).any()) or bool((docs < 0).any()):
            raise ValueError("lexical counts have negative values")

    @staticmethod
    def _sparse(
        tensors: dict[str, torch.Tensor], labels: int, buckets: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The entries' (label, bucket) index, their counts, and the order that sorts them by
        bucket, then label, for ``_SparseColumns`` (None: they are in that order, as ``state``
        writes them). Strictly increasing keys also say that no entry repeats, so a version
        written by ``state`` loads without a sort (on the server's hot-swap path)."""
        index, values = _integers(tensors["lexical.index"]).long(), tensors["lexical.count"].float()
        if index.dim() != 2 or index.shape[1] != 2 or values.shape != index.shape[:1]:
            raise ValueError("lexical counts have malformed shapes")
        if index.numel():
            low, high = (bound.tolist() for bound in index.aminmax(dim=0))
            if min(low) < 0 or high[0] >= labels or high[1] >= buckets:
                raise ValueError("lexical counts index past their labels or buckets")
        keys = index[:, 1] * max(1, labels) + index[:, 0]
        if bool((keys[1:] > keys[:-1]).all()):
            return index, values, None
        keys, order = torch.sort(keys)
        if bool((keys[1:] == keys[:-1]).any()):
            raise ValueError("lexical counts name a bucket of a label twice")  # the totals would not be the counts'
        return index, values, order

    def dense(self) -> torch.Tensor:
        """The counts as a (labels, buckets) matrix."""
        if self.matrix is not None:
            return self.matrix
        counts = torch.zeros(self.docs.shape[0], self.buckets)
        counts[self.index[:, 0], self.index[:, 1]] = self.values
        return counts

    def seen(self) -> torch.Tensor:
        """Buckets with any word (counts are not negative)."""
        if self.matrix is not None:
            return self.matrix.sum(0) > 0
        seen = torch.zeros(self.buckets, dtype=torch.bool)
        seen[self.index[self.values > 0, 1]] = True
        return seen


def _integers(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` if it holds integers (a float bucket count of inf or an index of 0.5 is refused, not truncated)."""
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise ValueError(f"lexical counts have {tensor.dtype} where integers belong")
    return tensor


class WordScorer:
    """A version's word counts as the server and the gate read them (read-only). Only the columns
    of a request's words are gathered and scored at each call, so building one costs nothing of
    the counts' size. ``read`` takes a stored state as it is: counts stored sparse stay sparse
    (a version of 1,000 labels keeps its few words, not a 128 MiB matrix, wherever it is held).
    Built from a ``Lexicon``, it reads the lexicon's counts but keeps its totals as they were:
    build it from a lexicon that no longer learns, or use it at once (the trainer's live answers)."""

    def __init__(self, lexicon: Lexicon, labels: int) -> None:
        lexicon._grow(labels)
        counts = lexicon.counts[:labels]
        vocabulary = int(lexicon.seen.sum())
        self._init(lexicon.weight, lexicon.buckets, lexicon.totals[:labels], vocabulary, lexicon.docs[:labels])
        self._gather: Callable[[torch.Tensor], torch.Tensor] = lambda buckets: counts[:, buckets]

    @classmethod
    def read(cls, tensors: dict[str, torch.Tensor], labels: int) -> WordScorer:
        """The scorer of a ``Lexicon.state`` of at most ``labels`` labels; ``ValueError`` for a malformed one."""
        checked = _CheckedState(tensors, labels)
        scorer = cls.__new__(cls)
        pad = labels - checked.docs.shape[0]  # labels the counts have not seen yet score as empty rows
        docs, totals = (torch.cat([t, torch.zeros(pad)]) for t in (checked.docs, checked.totals))
        matrix = checked.matrix
        if matrix is not None:  # rows of unseen labels added to each request's columns, not to the matrix
            scorer._gather = lambda buckets: torch.cat([matrix[:, buckets], torch.zeros(pad, len(buckets))])
            vocabulary = int(checked.seen().sum())
        else:
            columns = _SparseColumns(checked.index, checked.values, checked.order, labels)
            scorer._gather, vocabulary = columns.gather, columns.vocabulary()
        scorer._init(_weight(checked.losses), checked.buckets, totals, vocabulary, docs)
        return scorer

    def _init(self, weight: float, buckets: int, totals: torch.Tensor, vocabulary: int, docs: torch.Tensor) -> None:
        self.weight = weight
        self.buckets = buckets
        self.denominator = _denominator(totals, vocabulary)
        self.prior = _log_prior(docs)

    def probabilities(self, texts: Sequence[str]) -> torch.Tensor:
        bags = Bags(texts, self.buckets)
        return _score(_columns(self._gather(bags.index), self.denominator), self.prior, bags)


class _SparseColumns:
    """Sparse counts ordered by bucket, so that the columns of a few buckets are gathered without
    a dense matrix: each bucket's entries are one run, found by binary search at each request
    (a table of every bucket's start, built at load, cost more than the rest of a hot swap)."""

    def __init__(self, index: torch.Tensor, values: torch.Tensor, order: torch.Tensor | None, labels: int) -> None:
        """``order``: the entries' order by bucket, then label (``_CheckedState._sparse``'s; None:
        in that order already). Copies either way: the scorer never shares the state's tensors."""
        index, values = (index[order], values[order]) if order is not None else (index.clone(), values.clone())
        self.labels = labels
        self.label = index[:, 0]
        self.value = values
        self.bucket = index[:, 1].contiguous()

    def vocabulary(self) -> int:
        """How many buckets hold a word (a positive count): runs of the sorted buckets, without a
        mask of every bucket."""
        words = self.bucket[self.value > 0]
        return int((words[1:] != words[:-1]).sum()) + int(len(words) > 0)

    def gather(self, buckets: torch.Tensor) -> torch.Tensor:
        """The counts of ``buckets`` (K,) for every label (labels, K)."""
        first = torch.searchsorted(self.bucket, buckets)
        runs = torch.searchsorted(self.bucket, buckets, right=True) - first
        column = torch.repeat_interleave(torch.arange(len(buckets)), runs)
        run_start = torch.repeat_interleave(torch.cumsum(runs, 0) - runs, runs)
        entry = torch.repeat_interleave(first, runs) + torch.arange(len(column)) - run_start
        out = torch.zeros(self.labels, len(buckets))
        out[self.label[entry], column] = self.value[entry]
        return out


def _weight(losses: torch.Tensor) -> float:
    """The adapter's share of the blend: the grid's weight of the lowest loss (the adapter alone on ties)."""
    return float(WEIGHTS[int(torch.argmin(losses))])


def _denominator(totals: torch.Tensor, vocabulary: int) -> torch.Tensor:
    """log(words of each label + smoothing over the ``vocabulary`` seen, the buckets with any word) (C,)."""
    return torch.log(totals + ALPHA * max(1, vocabulary))


def _columns(counts: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """log P(bucket | label) from the counts of the buckets a request names (C, K)."""
    return torch.log(counts + ALPHA) - denominator[:, None]


def _log_prior(docs: torch.Tensor) -> torch.Tensor:
    """log P(label) (C,); -inf for a label without events (log 0), so it gets no probability."""
    return torch.log(docs / docs.sum().clamp_min(1.0))


def _score(columns: torch.Tensor, prior: torch.Tensor, bags: Bags) -> torch.Tensor:
    """P(label | words) (N, C) from log P(bucket | label) of every entry of ``bags`` (C, K); rows of
    zeros where no label has events."""
    if not bool(torch.isfinite(prior).any()):
        return torch.zeros(bags.texts, prior.shape[0])
    likelihood = torch.zeros(prior.shape[0], bags.texts).index_add_(1, bags.owner, columns * bags.count)
    return torch.softmax(prior[:, None] + likelihood, dim=0).T.contiguous()


def blend(adapter: torch.Tensor, counts: torch.Tensor, weight: float) -> torch.Tensor:
    """The served mixture (N, C): ``weight`` of the adapter's probabilities; rows the counts cannot
    score (no label has events) stay the adapter's."""
    if weight >= 1.0:
        return adapter
    known = counts.sum(-1, keepdim=True) > 0
    return torch.where(known, weight * adapter + (1 - weight) * counts, adapter)
