"""Test helpers: a tiny random-initialised model, a synthetic keyword stream, servers on free ports."""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path
from typing import Any

WORDS = [f"w{i}" for i in range(60)]
KEYWORDS = {label: [f"{label}{j}" for j in range(4)] for label in ("alpha", "beta", "gamma", "delta", "omega", "sigma")}


def build_tiny_model(directory: Path, hidden: int = 64, layers: int = 2) -> Path:
    """A random-initialised BERT with a word-level vocabulary covering the synthetic stream."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *(k for ks in KEYWORDS.values() for k in ks)]
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(str(directory))
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=128,
        num_labels=2,
    )
    import torch

    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(str(directory))
    return directory


def keyword_text(rng: random.Random, label: str, length: int = 3) -> str:
    words = [rng.choice(WORDS) for _ in range(length)]
    words.insert(rng.randrange(len(words) + 1), rng.choice(KEYWORDS[label]))
    return " ".join(words)


def keyword_events(
    n: int, labels: list[str], seed: int = 0, prefix: str = "e", relabel: dict[str, str] | None = None, start: int = 0
) -> list[dict[str, Any]]:
    """``n`` events whose label is given by the keyword in the text; ``relabel`` flips labels (concept drift)."""
    rng = random.Random(seed)
    out = []
    for i in range(start, start + n):
        label = rng.choice(labels)
        text = keyword_text(rng, label)
        out.append({"id": f"{prefix}{i}", "text": text, "label": (relabel or {}).get(label, label)})
    return out


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    with open(path, "wb") as fh:
        for row in rows:
            fh.write(row if isinstance(row, bytes) else json.dumps(row).encode())
            fh.write(b"\n")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
