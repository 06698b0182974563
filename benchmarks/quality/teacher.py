"""A fine-tuned teacher for the distillation benchmark, prepared offline.

``python -m benchmarks.quality.teacher --source ../shared/datasets/ag_news/train.jsonl
[--dataset ag_news] [--epochs 2] [--max-length 96]`` writes
``benchmarks/quality/data/<dataset>/teacher-mpnet-ft.json``, which
``python -m benchmarks.quality.distill --teacher mpnet-ft`` reads.

The teacher is all-mpnet-base-v2 (110M parameters, five times the student's base; fetched by
``benchmarks.models``) with a linear head on its mean-pooled output, every weight fine-tuned
on the ``--source`` rows whose text is neither in the benchmark's training split (the texts the
student streams) nor in its test split. Its distribution for each of the student's texts is
therefore a prediction on a text it never trained on, as a larger model labelling a live
stream would give, not a recollection of the label (a model fitted on the streamed texts
themselves hands back little more than their one-hot labels). The file holds the teacher's
log-probabilities for every text of the benchmark's training split (``compact``), its top label
for every test text and the test accuracy they give, and how it was made. On a 2-core CPU:
about 40 minutes for AG News (4,200 texts, two epochs, ``--max-length 96``), about 36 for
banking77 (8,461 short texts, two epochs, ``--max-length 64``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"
FILE = "teacher-mpnet-ft.json"
BATCH = 16


def rows(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def encode(model: Any, tokenizer: Any, texts: list[str], max_length: int) -> Any:
    """Mean-pooled last hidden states, (B, H), with gradients if the model is training."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"][:, :, None].to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def fine_tune(train: list[dict[str, str]], classes: list[str], epochs: int, max_length: int, seed: int) -> Any:
    """all-mpnet-base-v2 and a linear head trained on ``train``; returns ``(model, head, tokenizer)``."""
    import torch
    from transformers import AutoModel, AutoTokenizer, get_linear_schedule_with_warmup

    from benchmarks.models import fetch

    torch.manual_seed(seed)
    path = str(fetch("mpnet"))
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).train()
    head = torch.nn.Linear(model.config.hidden_size, len(classes))
    index = {c: i for i, c in enumerate(classes)}
    optimizer = torch.optim.AdamW(
        [{"params": model.parameters(), "lr": 3e-5}, {"params": head.parameters(), "lr": 1e-3}], weight_decay=0.01
    )
    steps = epochs * -(-len(train) // BATCH)
    schedule = get_linear_schedule_with_warmup(optimizer, steps // 10, steps)
    rng, done, started = random.Random(seed), 0, time.monotonic()
    for epoch in range(epochs):
        order = rng.sample(train, len(train))
        for i in range(0, len(order), BATCH):
            batch = order[i : i + BATCH]
            logits = head(encode(model, tokenizer, [r["text"] for r in batch], max_length))
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor([index[r["label"]] for r in batch]))
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            done += 1
            if done % 50 == 0:
                seconds = time.monotonic() - started
                print(f"epoch {epoch} step {done}/{steps} loss {loss.item():.3f} {seconds:.0f} s", flush=True)
    return model.eval(), head.eval(), tokenizer


def predict(model: Any, head: Any, tokenizer: Any, texts: list[str], max_length: int) -> Any:
    """The teacher's class log-probabilities, (N, C) as numpy."""
    import torch

    with torch.no_grad():
        parts = [head(encode(model, tokenizer, texts[i : i + 64], max_length)) for i in range(0, len(texts), 64)]
    return torch.log_softmax(torch.cat(parts), dim=-1).numpy()


def compact(log_probs: Any) -> list[list[float]]:
    """Log-probabilities rounded to 0.01 (each probability within 0.5% of its own, up to
    renormalising): a 77-class teacher of 1,540 texts in 0.8 MB, where a ``{label: p}`` per text
    took 5 MB."""
    return [[round(float(x), 2) for x in row] for row in log_probs]


def distributions(prepared: dict[str, Any]) -> list[dict[str, float]]:
    """The teacher's probabilities for each training text, ``{class: p}``, from a prepared file."""
    import math

    out = []
    for row in prepared["train_log_probs"]:
        top = max(row)
        weights = [math.exp(x - top) for x in row]
        total = sum(weights)
        out.append({c: w / total for c, w in zip(prepared["classes"], weights, strict=True)})
    return out


def prepare(source: Path, dataset: str, epochs: int, max_length: int, seed: int) -> dict[str, Any]:
    train, test = rows(DATA / dataset / "train.jsonl"), rows(DATA / dataset / "test.jsonl")
    seen = {r["text"] for r in train} | {r["text"] for r in test}
    own = [r for r in rows(source) if r["text"] not in seen]
    if not own:
        raise SystemExit(f"{source}: no row whose text is outside the benchmark's {dataset} splits")
    classes = sorted({r["label"] for r in own})
    if missing := {r["label"] for r in train + test} - set(classes):
        raise SystemExit(f"{source}: no row labelled {sorted(missing)}")
    started = time.process_time()
    model, head, tokenizer = fine_tune(own, classes, epochs, max_length, seed)
    probs = {
        split: predict(model, head, tokenizer, [r["text"] for r in part], max_length)
        for split, part in (("train", train), ("test", test))
    }
    predicted = [int(k) for k in probs["test"].argmax(1)]
    accuracy = sum(k == classes.index(r["label"]) for k, r in zip(predicted, test, strict=True)) / len(test)
    return {
        "model": "all-mpnet-base-v2, every weight fine-tuned, linear head on the mean-pooled output",
        "source": source.name,
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "fine_tuned_on": len(own),
        "epochs": epochs,
        "max_length": max_length,
        "seed": seed,
        "cpu_s": round(time.process_time() - started),
        "classes": classes,
        "test_accuracy": accuracy,
        "train_log_probs": compact(probs["train"]),  # in the order of train.jsonl and of classes
        "test_predicted": predicted,  # the index in classes of the teacher's top label for each test text
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--source", type=Path, required=True, help="JSON Lines of {text, label} to fine-tune on")
    parser.add_argument("--dataset", default="ag_news")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = prepare(args.source, args.dataset, args.epochs, args.max_length, args.seed)
    out = DATA / args.dataset / FILE
    out.write_text(json.dumps(result) + "\n")
    print(f"{out}: fine-tuned on {result['fine_tuned_on']} texts, test accuracy {100 * result['test_accuracy']:.1f}%")


if __name__ == "__main__":
    main()
