"""Learning quality on drifting streams: dynft against its baselines (``python -m benchmarks.quality``).

``streams`` builds four drifting streams from ``data/``; ``methods`` runs each method on a
stream (dynft through its real training loop, watched by ``recording``); ``paradigms``
compares fine-tuning methods; ``scores`` turns runs into figures; ``harness`` schedules the
jobs over worker processes; ``report`` writes the Markdown, JSON and plots; ``suites`` holds
the quick and full sizes; ``prepare`` made the data files.
"""
