"""Process-wide tuning for long-running dynft processes.

CPython's cyclic garbage collector walks every tracked object of the oldest generation on a
full collection. After start-up a trainer holds hundreds of thousands of long-lived objects
(torch, transformers, kafka-python modules and the model), and the ingest path allocates and
frees events at tens of thousands per second, which triggers frequent full walks: measured
on the Kafka ingest path, collections cost a third of the throughput. ``gc.freeze()`` moves
what start-up created out of the collector's sight, and a larger first-generation threshold
makes young collections rarer. Reference cycles are still collected.
"""

from __future__ import annotations

import gc


def tune_gc(young_threshold: int = 10_000) -> None:
    """Call once the model is loaded, before the source starts (see ``TrainingLoop.startup``)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young_threshold, middle, old)
