"""The embedded default source: a real labeled dataset replayed as a stream with scheduled drift.

The data is 12 intents of BANKING77 (CC BY 4.0, see ``dynft/data/demo/README.md``). Each cycle
of the schedule has two phases:

1. six intents, about 70% of their examples;
2. six new intents appear, mixed with the rest of the first six: new classes, and the label
   mix shifts toward them.

With ``loop`` on, the schedule starts again, reshuffled, after its last phase (the first six
intents come back to dominate: a recurring concept). Event ids are ``demo-<cycle>-<n>``.
"""

from __future__ import annotations

import json
import random
import time
from importlib import resources
from typing import Any

from dynft.sources.base import Record, Source

PHASE1 = (
    "card_arrival",
    "card_payment_fee_charged",
    "exchange_rate",
    "lost_or_stolen_card",
    "top_up_failed",
    "change_pin",
)
PHASE2 = (
    "apple_pay_or_google_pay",
    "atm_support",
    "terminate_account",
    "age_limit",
    "country_support",
    "cash_withdrawal_charge",
)
PHASE1_SHARE = 0.7  # share of the first intents' examples streamed before the new ones appear


def load_demo_rows() -> list[dict[str, str]]:
    """The packaged demo dataset, in file order."""
    text = resources.files("dynft.data.demo").joinpath("banking77-12.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def schedule(rows: list[dict[str, str]], seed: int) -> tuple[list[dict[str, str]], int]:
    """One cycle of the drift schedule: the ordered rows and the index where phase 2 starts."""
    rng = random.Random(seed)
    old = [r for r in rows if r["label"] in PHASE1]
    new = [r for r in rows if r["label"] in PHASE2]
    rng.shuffle(old)
    cut = int(len(old) * PHASE1_SHARE)
    phase2 = old[cut:] + new
    rng.shuffle(phase2)
    return old[:cut] + phase2, cut


class DemoSource(Source):
    """Replays the packaged dataset; ``rate`` caps events per second (0 = no cap)."""

    def __init__(self, rate: float = 0.0, loop: bool = True, seed: int = 0) -> None:
        self.uri = "demo"
        self._rows = load_demo_rows()
        self._rate = rate
        self._loop = loop
        self._seed = seed
        self._cycle = 0
        self._order, self.drift_index = schedule(self._rows, seed)
        self._next = 0
        self._started = 0.0
        self._emitted = 0

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        if not self._started:
            self._started = time.monotonic()
        budget = max_records
        if self._rate > 0:
            due = int((time.monotonic() - self._started) * self._rate) - self._emitted
            if due <= 0:
                time.sleep(min(timeout_s, 1.0 / self._rate))
                due = int((time.monotonic() - self._started) * self._rate) - self._emitted
            budget = max(0, min(budget, due))
        out: list[Record] = []
        while len(out) < budget and not self.exhausted:
            if self._next == len(self._order):
                self._cycle += 1
                self._order, _ = schedule(self._rows, self._seed + self._cycle)
                self._next = 0
            row = self._order[self._next]
            event: dict[str, Any] = {"id": f"demo-{self._cycle}-{self._next}", **row}
            self._next += 1
            out.append(Record(json.dumps(event).encode(), "demo", self._cycle * len(self._order) + self._next))
        self._emitted += len(out)
        return out

    @property
    def exhausted(self) -> bool:
        return not self._loop and self._next == len(self._order)

    def resume_from(self, positions: dict[str, int]) -> None:
        """Continue the schedule after the last event of a checkpoint."""
        done = positions.get("demo", 0)
        cycle, self._next = divmod(done, len(self._order))
        if cycle and not self._loop:
            cycle, self._next = 0, len(self._order)
        if cycle != self._cycle:
            self._cycle = cycle
            self._order, _ = schedule(self._rows, self._seed + cycle)
