"""The bounded replay buffer: what the trainer rehearses so that it does not forget.

The buffer is bounded by event count and by bytes. Its ``strategy`` decides both what it
keeps when full and how it samples:

- ``reservoir``: a uniform sample of everything seen (Vitter's algorithm R); uniform sampling.
- ``class_balanced``: evicts from the largest class; samples a class uniformly, then an event.
- ``recency``: evicts the oldest; samples with weight halving every ``recency_half_life`` events.

``sample(n, recent_since=s, recent_share=p)`` draws a share ``p`` of the sample from events
that arrived at or after sequence number ``s`` (used to up-weight post-drift data).

>>> from dynft.events import Event
>>> buf = ReplayBuffer(max_events=3, max_bytes=1 << 20, strategy="recency", seed=0)
>>> buf.add_many(Event(id=str(i), text=f"text {i}", label="a" if i % 2 else "b") for i in range(5))
5
>>> len(buf), sorted(e.id for e in buf.events())
(3, ['2', '3', '4'])
>>> len(buf.sample(8))
8
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any, Literal, NamedTuple

from dynft.events import Event

Strategy = Literal["reservoir", "class_balanced", "recency"]
INDEXED_LABELS = 64  # class_balanced keeps an index of labels by size beyond this many labels


class _Entry(NamedTuple):
    seq: int
    event: Event
    nbytes: int


class ReplayBuffer:
    """A bounded, thread-safe store of past events with three sampling strategies."""

    def __init__(
        self,
        max_events: int,
        max_bytes: int,
        strategy: Strategy = "class_balanced",
        recency_half_life: int = 2000,
        seed: int = 0,
    ) -> None:
        if max_events < 1 or max_bytes < 1:
            raise ValueError(f"buffer bounds must be positive, got {max_events} events, {max_bytes} bytes")
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.strategy = strategy
        self.recency_half_life = recency_half_life
        self._rng = random.Random(seed)
        self._by_label: dict[str, list[_Entry]] = {}  # each list in arrival order
        # class_balanced with more than INDEXED_LABELS labels: the labels holding k events, per k (a
        # group may be empty), and the largest k with a label, so that eviction finds a largest class
        # in O(1); a scan of every label per eviction cost 1,000 list lengths an event at 1,000 labels.
        # With few labels the scan is cheaper than keeping the index (0.5 us an event at 12 labels).
        self._by_size: dict[int, dict[str, None]] = {}
        self._largest = 0
        self._indexed = False
        # class_balanced with the scan: never below the largest class's size (adds raise it, removals
        # leave it). A class just grown to it is a largest class, found without the scan: when the
        # buffer is full and balanced, each event evicts from its own class at O(1).
        self._top = 0
        self._count = 0
        self._bytes = 0
        self._seen = 0  # events offered, kept or not: the reservoir's n and the sequence clock
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        return self._bytes

    @property
    def seen(self) -> int:
        """Events offered so far; the sequence number the next event gets."""
        return self._seen

    def label_counts(self) -> Counter[str]:
        with self._lock:
            return Counter({label: len(entries) for label, entries in self._by_label.items() if entries})

    def events(self) -> list[Event]:
        """Every buffered event, oldest first."""
        with self._lock:
            entries = sorted((e for es in self._by_label.values() for e in es), key=lambda e: e.seq)
        return [e.event for e in entries]

    def add(self, event: Event) -> bool:
        """Offer an event; returns whether it was kept."""
        with self._lock:
            return self._add(event)

    def add_many(self, events: Iterable[Event]) -> int:
        """Offer several events under one lock; returns how many were kept."""
        with self._lock:
            return sum(self._add(e) for e in events)

    def _add(self, event: Event) -> bool:
        seq = self._seen
        self._seen += 1
        size = event.nbytes
        if size > self.max_bytes:
            return False
        if self.strategy == "reservoir" and self._count >= self.max_events:
            if self._rng.randrange(self._seen) >= self.max_events:  # keep with probability max_events / seen
                return False
            self._evict_random()
        label = event.label
        entries = self._by_label.get(label)
        if entries is None:
            entries = self._by_label[label] = []
            if not self._indexed and self.strategy == "class_balanced" and len(self._by_label) > INDEXED_LABELS:
                self._reindex()
        entries.append(_Entry(seq, event, size))
        if self._indexed:
            self._grew(label, len(entries))
        elif len(entries) > self._top:
            self._top = len(entries)
        self._count += 1
        self._bytes += size
        while self._count > self.max_events or self._bytes > self.max_bytes:
            self._evict(entries)
        return True

    def resize(self, max_events: int, max_bytes: int) -> None:
        """New bounds (a task's share changes as tasks come: ``dynft.taskloop``); evicts down to them at once."""
        if max_events < 1 or max_bytes < 1:
            raise ValueError(f"buffer bounds must be positive, got {max_events} events, {max_bytes} bytes")
        with self._lock:
            self.max_events, self.max_bytes = max_events, max_bytes
            while self._count > self.max_events or self._bytes > self.max_bytes:
                self._evict()

    def _evict(self, grown: list[_Entry] | None = None) -> None:
        """Evict one event; ``grown``: the class an event was just added to."""
        if self.strategy == "recency":
            oldest = min((es for es in self._by_label.values() if es), key=lambda es: es[0].seq)
            self._remove(oldest, 0)
        elif self.strategy == "class_balanced":
            if self._indexed:
                largest = self._by_label[next(iter(self._by_size[self._largest]))]
            elif grown is not None and len(grown) == self._top:
                largest = grown
            else:
                largest = max(self._by_label.values(), key=len)
                self._top = len(largest)
            self._remove(largest, int(self._rng.random() * len(largest)))
        else:
            self._evict_random()

    def _evict_random(self) -> None:
        index = self._rng.randrange(self._count)
        for entries in self._by_label.values():
            if index < len(entries):
                self._remove(entries, index)
                return
            index -= len(entries)

    def _remove(self, entries: list[_Entry], index: int) -> None:
        if self.strategy == "recency":
            entry = entries.pop(index)  # recency needs each label's entries in arrival order
        else:  # order does not matter: swap with the last, O(1)
            entry = entries[index]
            entries[index] = entries[-1]
            entries.pop()
        if self._indexed:
            self._shrank(entry.event.label, len(entries))
        self._count -= 1
        self._bytes -= entry.nbytes

    def _grew(self, label: str, now: int) -> None:
        """``label`` holds ``now`` events, one more than before."""
        if now > 1:
            del self._by_size[now - 1][label]
        self._group(now)[label] = None
        if now > self._largest:
            self._largest = now

    def _shrank(self, label: str, now: int) -> None:
        """``label`` holds ``now`` events, one fewer than before."""
        group = self._by_size[now + 1]
        del group[label]
        if now:
            self._group(now)[label] = None
        if now + 1 == self._largest and not group:
            self._largest = now

    def _group(self, size: int) -> dict[str, None]:
        """The labels holding ``size`` events (an empty group stays: labels pass through sizes often)."""
        group = self._by_size.get(size)
        if group is None:
            group = self._by_size[size] = {}
        return group

    def _reindex(self) -> None:
        """Rebuild the labels-by-size index (class_balanced, many labels) from the lists as they are."""
        self._by_size = {}
        self._indexed = self.strategy == "class_balanced" and len(self._by_label) > INDEXED_LABELS
        if not self._indexed:  # the scan's bound again: adds under the index did not keep it
            self._top = max(map(len, self._by_label.values()), default=0)
            return
        for label, entries in self._by_label.items():
            if entries:
                self._group(len(entries))[label] = None
        self._largest = max(self._by_size, default=0)

    def sample(self, n: int, recent_since: int | None = None, recent_share: float = 0.0) -> list[Event]:
        """``n`` events drawn with replacement by the buffer's strategy (fewer only if it is empty).

        With ``recent_since``, a share ``recent_share`` of the draws comes from events whose
        sequence number is at least ``recent_since`` (when there are any).
        """
        with self._lock:
            if n <= 0 or self._count == 0:
                return []
            out: list[Event] = []
            if recent_since is not None and recent_share > 0:
                recent = [e for es in self._by_label.values() for e in es if e.seq >= recent_since]
                if recent:
                    out = [self._rng.choice(recent).event for _ in range(round(n * recent_share))]
            out.extend(self._draw(n - len(out)))
            return out

    def _draw(self, n: int) -> list[Event]:
        if n <= 0:
            return []
        groups = [es for es in self._by_label.values() if es]
        if self.strategy == "class_balanced":
            return [self._rng.choice(self._rng.choice(groups)).event for _ in range(n)]
        entries = [e for es in groups for e in es]
        if self.strategy == "recency":
            newest = self._seen - 1
            weights = [0.5 ** ((newest - e.seq) / self.recency_half_life) for e in entries]
            return [e.event for e in self._rng.choices(entries, weights=weights, k=n)]
        return [self._rng.choice(entries).event for _ in range(n)]

    def snapshot(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The buffered events (oldest first, with their sequence numbers) and the sampler's state."""
        with self._lock:
            entries = sorted((e for es in self._by_label.values() for e in es), key=lambda e: e.seq)
            version, internal, gauss = self._rng.getstate()
            state = {"seen": self._seen, "rng": [version, list(internal), gauss]}
        return [{"seq": e.seq, "event": e.event.to_builtins()} for e in entries], state

    def restore(self, records: list[dict[str, Any]], state: dict[str, Any]) -> None:
        """Refill from a ``snapshot``; the current bounds apply (they may have changed)."""
        self.clear()
        for record in records:
            self._seen = record["seq"]
            self.add(Event.from_builtins(record["event"]))
        version, internal, gauss = state["rng"]
        with self._lock:
            self._seen = state["seen"]
            self._rng.setstate((version, tuple(internal), gauss))

    def clear(self) -> None:
        with self._lock:
            self._by_label.clear()
            self._reindex()
            self._count = 0
            self._bytes = 0

    def retire_before(self, seq: int) -> int:
        """Remove the events with a sequence number below ``seq`` (an old concept); returns how many."""
        with self._lock:
            removed = 0
            for label, entries in list(self._by_label.items()):
                kept = [e for e in entries if e.seq >= seq]
                removed += len(entries) - len(kept)
                self._count -= len(entries) - len(kept)
                self._bytes -= sum(e.nbytes for e in entries if e.seq < seq)
                self._by_label[label] = kept
            self._reindex()
            return removed


def fair_shares(wants: list[int], capacity: int) -> list[int]:
    """Max-min fair shares of ``capacity`` (the tasks' replay buffers, ``dynft.taskloop``): each
    gets what it wants, up to an even split of what those wanting less left; what nobody wants is
    split evenly on top, so the shares always add up to ``capacity`` (at least 1 each).

    >>> fair_shares([10, 10_000, 5_000], 3_000)  # a small task keeps its events, the others split the rest
    [10, 1495, 1495]
    >>> fair_shares([10, 20], 100)
    [45, 55]
    """
    n = len(wants)
    shares = [0] * n
    left = capacity
    for k, i in enumerate(sorted(range(n), key=wants.__getitem__)):
        shares[i] = min(wants[i], left // (n - k))
        left -= shares[i]
    return [max(1, share + left // n + (1 if i < left % n else 0)) for i, share in enumerate(shares)]
