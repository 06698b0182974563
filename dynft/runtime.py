"""Process-wide tuning for long-running dynft processes.

CPython's cyclic garbage collector walks every tracked object of the oldest generation on a
full collection. After start-up a trainer holds hundreds of thousands of long-lived objects
(torch, transformers, kafka-python modules and the model), and the ingest path allocates and
frees events at tens of thousands per second, which triggers frequent full walks: measured
on the Kafka ingest path, collections cost a third of the throughput. ``gc.freeze()`` moves
what start-up created out of the collector's sight, and a larger first-generation threshold
makes young collections rarer. Reference cycles are still collected.

What is frozen is never collected, not even as the interpreter exits, so ``freeze`` hands it
back to the collector at exit: nanobind modules (triton's, which ``import torch`` loads in
torch 2.15) report each object of theirs still alive then as leaked, 27 lines on stderr at
every clean stop of ``dynft run``.
"""

from __future__ import annotations

import atexit
import gc


def tune_gc(young_threshold: int = 10_000) -> None:
    """Call once the model is loaded, before the source starts (see ``TrainingLoop.startup``)."""
    freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young_threshold, middle, old)


def freeze() -> None:
    """Collect, then move every object alive now out of the collector's sight until exit."""
    gc.collect()
    gc.freeze()
    atexit.unregister(gc.unfreeze)  # once per process, however often it freezes
    atexit.register(gc.unfreeze)  # atexit runs before the interpreter's last collection
