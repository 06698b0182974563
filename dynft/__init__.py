"""dynft: a streaming continual-learning daemon for text classification.

Labeled events stream in, land in a bounded replay buffer, and train a LoRA adapter
incrementally; drift detectors watch the prequential error; every improvement that passes
the promotion gate is hot-swapped into the co-located inference server.
"""

__version__ = "0.1.0"
