"""Give a model directory that holds only a BERT config and tokenizer random weights.

``python benchmarks/gpu/random_weights.py DIR``: for a GPU host that cannot take the packaged
all-MiniLM-L6-v2 (see README.md here); timings need the shapes, not the trained values.
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoConfig, BertModel

if __name__ == "__main__":
    torch.manual_seed(0)
    BertModel(AutoConfig.from_pretrained(sys.argv[1])).save_pretrained(sys.argv[1])
