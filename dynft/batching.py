"""Turning events into tensors: the growing label map and the collator (dynamic padding).

Tokenization happens here, on the loop's batching thread, so the training step only sees
ready tensors.

>>> labels = LabelMap(capacity=3)
>>> labels.ids(["b", "a", "b"]), labels.labels
([0, 1, 0], ['b', 'a'])
>>> labels.admit("c"), labels.fits("d"), labels.admit("d"), labels.admit("a")
(True, False, False, True)
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from dynft.events import Event


class LabelMap:
    """Label names by id; ids are handed out in order of first appearance and never change.

    ``capacity`` bounds the labels that ``admit`` adds (``trainer.max_labels``), so that a
    producer sending ids as labels cannot grow the head without bound; ``ids`` is not bounded,
    because a checkpoint or a published version restores the labels it was trained with.
    """

    def __init__(self, labels: Sequence[str] = (), capacity: int | None = None) -> None:
        self._labels: list[str] = []
        self._ids: dict[str, int] = {}
        self._lock = threading.Lock()
        self.capacity = capacity
        self.ids(labels)

    @property
    def labels(self) -> list[str]:
        with self._lock:
            return list(self._labels)

    def __len__(self) -> int:
        return len(self._labels)

    def get(self, label: str) -> int | None:
        return self._ids.get(label)

    def fits(self, label: str) -> bool:
        """Whether ``label`` has an id or could get one within the capacity (the map is not changed)."""
        with self._lock:
            return label in self._ids or self.capacity is None or len(self._labels) < self.capacity

    def fits_all(self, labels: Sequence[str]) -> bool:
        """Whether every one of ``labels`` has an id or could get one within the capacity (no change)."""
        with self._lock:
            new = {label for label in labels if label not in self._ids}
            return self.capacity is None or len(self._labels) + len(new) <= self.capacity

    def admit(self, label: str) -> bool:
        """Whether ``label`` has an id, adding it if the capacity allows; ``False``: the map is full."""
        with self._lock:
            if label in self._ids:
                return True
            if self.capacity is not None and len(self._labels) >= self.capacity:
                return False
            self._ids[label] = len(self._labels)
            self._labels.append(label)
            return True

    def admit_all(self, labels: Sequence[str]) -> bool:
        """Whether every one of ``labels`` has an id, adding them all if the capacity allows, else none."""
        with self._lock:
            new = list(dict.fromkeys(label for label in labels if label not in self._ids))
            if self.capacity is not None and len(self._labels) + len(new) > self.capacity:
                return False
            for label in new:
                self._ids[label] = len(self._labels)
                self._labels.append(label)
            return True

    def ids(self, labels: Sequence[str]) -> list[int]:
        """The id of each label, adding unseen labels at the end."""
        out = []
        with self._lock:
            for label in labels:
                index = self._ids.get(label)
                if index is None:
                    index = self._ids[label] = len(self._labels)
                    self._labels.append(label)
                out.append(index)
        return out


@dataclass
class Batch:
    """A training batch; the first ``n_fresh`` rows are new events, the rest replayed ones."""

    events: list[Event]
    n_fresh: int
    num_labels: int  # size of the label map when the batch was made
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B,)
    weights: torch.Tensor  # (B,)
    # Knowledge distillation (dynft.distill), only where some event has a teacher: the teachers'
    # probabilities by label id (a row without a teacher holds its label's one-hot), and which
    # rows have a teacher and which a label of their own (not the teacher's top).
    teacher: torch.Tensor | None = None  # (B, C) with C = num_labels
    teacher_rows: torch.Tensor | None = None  # (B,) bool
    hard_rows: torch.Tensor | None = None  # (B,) bool

    def to(self, device: torch.device) -> Batch:
        non_blocking = device.type == "cuda"

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(
            self.events,
            self.n_fresh,
            self.num_labels,
            self.input_ids.to(device, non_blocking=non_blocking),
            self.attention_mask.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            self.weights.to(device, non_blocking=non_blocking),
            move(self.teacher),
            move(self.teacher_rows),
            move(self.hard_rows),
        )


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int, pad_multiple: int = 0
) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (B, T), padded to the longest text (rounded up to a
    multiple of ``pad_multiple``, so a compiled step sees few shapes); no row is empty.

    A text can tokenize to nothing: characters a tokenizer drops (zero-width spaces, bytes that a
    byte-level vocabulary lacks) leave a row of padding, which a decoder's head reads at a padded
    position, and a batch of such rows alone has no positions at all (decoders fail to reshape
    it). Such a row gets one token that carries no text (see ``filler_token``), where the
    tokenizer's padding side puts text, so it trains and predicts from the model's prior. The
    trainer, the gate and the server all tokenize here, so they read the same row.
    """
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]  # (B, T)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if pad_multiple:
        # Rounded up here, not by the tokenizer's pad_to_multiple_of, which refuses a max_length
        # that is not a multiple; and never past max_length, where a model's positions may end.
        extra = min(-(-ids.shape[1] // pad_multiple) * pad_multiple, max_length) - ids.shape[1]
        if extra > 0:
            where = (0, extra) if tokenizer.padding_side == "right" else (extra, 0)
            ids, mask = F.pad(ids, where, value=pad), F.pad(mask, where, value=0)
    empty = mask.sum(dim=1) == 0  # (B,)
    if bool(empty.any()):
        if ids.shape[1] == 0:  # every text was empty: one padded position to write into
            ids = torch.full((len(texts), 1), pad, dtype=torch.long)
            mask = torch.zeros((len(texts), 1), dtype=torch.long)
        column = 0 if tokenizer.padding_side == "right" else ids.shape[1] - 1
        ids[empty, column] = filler_token(tokenizer)
        mask[empty, column] = 1
    return {"input_ids": ids, "attention_mask": mask}


BUCKET_TOKENS = 16  # the padded-length bucket where shapes should repeat (see pad_multiple_for)


def pad_multiple_for(requested: int, compute_dtype: torch.dtype | None, compiled: bool) -> int:
    """The multiple padded lengths round up to: ``trainer.pad_multiple``, or when that is 0 (auto)
    ``BUCKET_TOKENS`` for a compiled step or bf16/fp16 compute, else none (pad to the longest).

    Why buckets under autocast: on a CPU, bf16 matrix products run in oneDNN, which keeps a
    compiled kernel and its buffers per distinct shape; with every padded length its own shape
    a trainer's heap grew by ~480 MiB over 80 MiniLM steps, against ~60 MiB with lengths in
    buckets of 16, which were also faster (fewer kernels built). A compiled step likewise sees
    few shapes. The trainer, the gate and the server pad alike, so they compute alike.

    >>> pad_multiple_for(0, None, False), pad_multiple_for(0, torch.bfloat16, False), pad_multiple_for(8, None, True)
    (0, 16, 8)
    """
    if requested:
        return requested
    return BUCKET_TOKENS if compiled or compute_dtype is not None else 0


def filler_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that stands for an empty text: unk, bos or eos, preferring one unlike the pad token.

    A decoder's head reads the last token that is not the pad token, so a filler equal to it
    would be skipped over where a padding token sits before it.
    """
    pad = tokenizer.pad_token_id
    candidates = [tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, pad]
    present = [int(c) for c in candidates if c is not None]
    if not present:
        return 0
    return next((c for c in present if c != pad), present[0])


class Collator:
    """Tokenizes events with padding to the longest text of the batch (dynamic padding)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        label_map: LabelMap,
        pin: bool = False,
        pad_multiple: int = 0,
    ):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_multiple = pad_multiple  # lengths in buckets (trainer.pad_multiple)
        self.label_map = label_map
        self.pin = pin
        # Fast tokenizers set padding/truncation on a shared Rust object at every call; two
        # threads tokenizing at once (batching thread, gate) can fail with "Already borrowed".
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        with self._lock:
            out = tokenize(self.tokenizer, texts, self.max_length, self.pad_multiple)
        if self.pin:
            out = {k: v.pin_memory() for k, v in out.items()}
        return out

    def __call__(self, events: Sequence[Event], n_fresh: int) -> Batch:
        enc = self.encode([e.text for e in events])
        ids = self.label_map.ids([e.label for e in events])
        labels = torch.tensor(ids, dtype=torch.long)
        weights = torch.tensor([float(e.weight) for e in events], dtype=torch.float32)
        batch = Batch(list(events), n_fresh, 0, enc["input_ids"], enc["attention_mask"], labels, weights)
        if any(e.teacher is not None for e in events):
            self._add_teachers(batch, ids)
        batch.num_labels = len(self.label_map)  # after the teachers' labels joined the map
        return batch

    def _add_teachers(self, batch: Batch, label_ids: list[int]) -> None:
        """Fill the batch's teacher tensors; teacher labels not seen before get ids, like labels."""
        rows = [
            (self.label_map.ids(list(e.teacher)), list(e.teacher.values())) if e.teacher else None for e in batch.events
        ]
        teacher = torch.zeros(len(rows), len(self.label_map), dtype=torch.float32)
        for i, row in enumerate(rows):
            if row is None:
                teacher[i, label_ids[i]] = 1.0
            else:
                teacher[i, row[0]] = torch.tensor(row[1], dtype=torch.float32)
        batch.teacher = teacher
        batch.teacher_rows = torch.tensor([row is not None for row in rows])
        batch.hard_rows = torch.tensor([not e.label_from_teacher for e in batch.events])
