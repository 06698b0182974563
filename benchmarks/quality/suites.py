"""The quick and full suites: stream sizes, and the few settings scaled to a stream's length.

dynft runs with its shipped defaults except where a default counts steps or seconds that a
benchmark stream is too short for, or would make a run depend on the machine's speed:

- ``drift.boost_steps`` (100) and ``drift.cooldown_events`` (200) are scaled to the stream:
  a reaction of 100 steps would cover most of a quick stream;
- ``registry.publish_every_steps`` (50) is scaled likewise, and ``registry.publish_interval_s``
  and ``checkpoint.interval_s`` are made very long so that versions are cut by steps only,
  the same on a fast and a slow machine;
- ``model.max_length`` is 32 tokens in the quick suite (64 by default and in the full one);
- ``trainer.threads`` is one per worker process (two workers on two cores).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from benchmarks.quality.streams import Sizes


@dataclass(frozen=True)
class Suite:
    name: str
    sizes: Sizes
    max_length: int
    boost_steps: int
    cooldown_events: int
    publish_every_steps: int
    window: int  # events in the rolling accuracy of the plots and of recovery times
    detection_horizon: int  # a detection this many events after a drift point is a true one
    anchor_weight: float  # dynft + anchor: trainer.anchor_weight
    fit_epochs: int  # static: epochs over its first 10% after learning it test-then-train
    refit_epochs: int  # periodic retrain: epochs of each fresh fit
    periodic_refits: int  # periodic retrain: fresh fits, evenly spaced over the stream
    anchor_streams: tuple[str, ...]  # streams that dynft + anchor runs on
    paradigm_train: int  # training events per dataset in the fine-tuning comparison
    paradigm_test: int
    paradigm_datasets: tuple[str, ...] = ("sst2", "mr", "subj", "trec6", "ag_news", "emotion")
    model_path: str | None = None  # default: the packaged all-MiniLM-L6-v2
    threads: int = 1
    streams: tuple[str, ...] = ("domain", "airline", "banking", "concept")
    extra_settings: dict[str, Any] = field(default_factory=dict)
    multitask_per_task: int = 240  # the multitask stream (benchmarks.quality.multitask): events per task
    multitask_intents: int = 12  # ... and BANKING77 intents of its ``intents`` task (20 events each)

    def with_overrides(self, **changes: Any) -> Suite:
        return replace(self, **changes)


QUICK = Suite(
    name="quick",
    sizes=Sizes(
        domain_per_phase=160,
        domain_test=60,
        airline_events=480,
        airline_test=40,
        banking_per_intent=8,
        banking_test_per_intent=4,
        concept_events=480,
        concept_test=60,
    ),
    max_length=32,
    boost_steps=20,
    cooldown_events=100,
    publish_every_steps=20,
    window=50,
    detection_horizon=150,
    anchor_weight=0.01,
    fit_epochs=2,
    refit_epochs=1,
    periodic_refits=2,
    anchor_streams=("domain", "banking"),
    paradigm_train=256,
    paradigm_test=100,
)

FULL = Suite(
    name="full",
    sizes=Sizes(
        domain_per_phase=600,
        domain_test=200,
        airline_events=1800,
        airline_test=100,
        banking_per_intent=20,
        banking_test_per_intent=10,
        concept_events=1800,
        concept_test=200,
    ),
    max_length=64,
    boost_steps=50,
    cooldown_events=200,
    publish_every_steps=25,
    window=100,
    detection_horizon=400,
    anchor_weight=0.01,
    fit_epochs=2,
    refit_epochs=1,
    periodic_refits=3,
    anchor_streams=("domain", "airline", "banking", "concept"),
    paradigm_train=600,  # with 6 datasets x 5 paradigms, the largest share of the 60-minute budget
    paradigm_test=250,
    multitask_per_task=600,
    multitask_intents=30,
)

SUITES = {"quick": QUICK, "full": FULL}


LWF_WEIGHT = 1.0  # trainer.lwf_weight of the "dynft + LwF" variant (Li & Hoiem's lambda)


def dynft_overrides(suite: Suite, variant: str) -> dict[str, Any]:
    """Settings of a dynft run (dotted keys, as for ``load_settings``) for a method variant."""
    out: dict[str, Any] = {
        "model.path": suite.model_path,
        "model.max_length": suite.max_length,
        "trainer.threads": suite.threads,
        "drift.boost_steps": suite.boost_steps,
        "drift.cooldown_events": suite.cooldown_events,
        "registry.publish_every_steps": suite.publish_every_steps,
        "registry.publish_interval_s": 1e9,
        "checkpoint.interval_s": 1e9,
        **suite.extra_settings,
    }
    if variant == "no-replay":  # plain sequential fine-tuning: nothing is ever rehearsed
        out |= {"buffer.replay_ratio": 0.0, "drift.boost_extra_steps": 0}
    elif variant == "anchor":
        out["trainer.anchor_weight"] = suite.anchor_weight
    elif variant == "lwf":  # the serving version's outputs distilled on replayed events, at the usual weight 1
        out["trainer.lwf_weight"] = LWF_WEIGHT
    elif variant == "ewc":  # the Fisher is scaled to mean 1, so EWC's weight sits on the L2 anchor's scale
        out["trainer.ewc_weight"] = suite.anchor_weight
    return out
