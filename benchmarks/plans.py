"""The suites: which models, shapes, durations and counts each benchmark uses.

``smoke`` checks that the harness runs (a tiny random model, seconds per benchmark, nothing
isolated in its own process); ``quick`` fits in about five minutes on a 2-core CPU with the
packaged all-MiniLM-L6-v2; ``full`` is sized for one H100/H200 (a second, larger model and
longer phases) and should take about six minutes there with ``--compile`` (estimated from the
phase times of the 2026-11-28 run, which took about eleven with twice these windows).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


@dataclass(frozen=True)
class TrainCase:
    """One throughput comparison: a model and the batch shape both contenders train on."""

    model: str  # shown in the results
    path: str  # Hugging Face model directory
    batch: int
    seq: int


@dataclass(frozen=True)
class Plan:
    suite: str
    device: str
    isolate: bool  # each contender in a fresh process
    threads: int  # torch threads of a training contender (as `dynft run` gives its trainer)
    model: str  # the serving model (hot swap, serving under training, freshness)
    model_path: str
    compile: bool  # also time the bare loop under torch.compile
    train_cases: tuple[TrainCase, ...]
    train_warmup_steps: int
    train_window_s: float  # dynft's measuring window (at least; whole publish periods)
    train_bare_s: float  # measuring window of each of the bare loop's two runs
    train_max_s: float  # a contender stops by then, window complete or not
    train_publish_interval_s: float
    train_holdout: int  # held-out window the gate scores (dynft's default: 256)
    swap_repeats: int  # timed repetitions of each in-memory swap
    swap_clients: int
    swap_quiet_s: float  # warm-up load before the swap phases (at most 2 s of it)
    swap_phase_s: float  # seconds of paced swaps under load per rate, in pieces that alternate with as long without
    serve_clients: int
    serve_busy_s: float
    serve_idle_s: float
    serve_event_rate: float  # events/s appended to the trainer's source
    ingest_events: int
    tasks_clients: int = 16  # closed-loop clients of the many-task serving benchmark (benchmarks/tasks.py)
    tasks_phase_s: float = 6.0  # each timed phase of it (one task, eight tasks, per-group passes)
    tasks_rounds: int = 2  # the phases alternate this many times


def packaged_model() -> str:
    """The packaged all-MiniLM-L6-v2, or ``$DYNFT_BENCH_MODEL``: a model directory of the same
    shape for a GPU host that lacks the package (random weights time the same as trained ones)."""
    from dynft.model import resolve_model_path

    return str(resolve_model_path(os.environ.get("DYNFT_BENCH_MODEL") or None))


def minilm_label() -> str:
    override = os.environ.get("DYNFT_BENCH_MODEL")
    return f"all-MiniLM-L6-v2 shape ({Path(override).name})" if override else "all-MiniLM-L6-v2 (packaged)"


def random_model(directory: Path, hidden: int, layers: int, heads: int, intermediate: int) -> str:
    """A random-initialised BERT that uses the packaged model's tokenizer (nothing is downloaded)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    if (directory / "config.json").is_file():
        return str(directory)
    directory.mkdir(parents=True, exist_ok=True)
    source = Path(packaged_model())
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, directory / name)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(str(directory))
    return str(directory)


def make_plan(suite: str, device: str, workdir: Path, compile: bool = False) -> Plan:
    # The trainer's threads under `dynft run`: the cores the co-located server (1 thread) leaves.
    trainer_threads = max(1, (os.cpu_count() or 1) - 1)
    if suite == "smoke":
        tiny = random_model(workdir / "tiny-bert", hidden=32, layers=2, heads=2, intermediate=64)
        return Plan(
            suite, device, False, 1, "tiny random BERT (2 layers, hidden 32)", tiny, compile,
            (TrainCase("tiny random BERT", tiny, 8, 32),),
            train_warmup_steps=2, train_window_s=2, train_bare_s=1, train_max_s=20, train_publish_interval_s=1,
            train_holdout=32,
            swap_repeats=10, swap_clients=2, swap_quiet_s=0.5, swap_phase_s=1,
            serve_clients=2, serve_busy_s=5, serve_idle_s=1, serve_event_rate=10,
            ingest_events=0, tasks_clients=8, tasks_phase_s=1.0, tasks_rounds=1,
        )  # fmt: skip
    minilm, label = packaged_model(), minilm_label()
    if suite == "quick":
        return Plan(
            suite, device, True, trainer_threads, "all-MiniLM-L6-v2 (packaged)", minilm, compile,
            (TrainCase("all-MiniLM-L6-v2", minilm, 16, 64),),
            train_warmup_steps=2, train_window_s=12, train_bare_s=6, train_max_s=100, train_publish_interval_s=15,
            train_holdout=256,
            swap_repeats=100, swap_clients=4, swap_quiet_s=3, swap_phase_s=6,
            serve_clients=4, serve_busy_s=28, serve_idle_s=4, serve_event_rate=2,
            ingest_events=100_000, tasks_clients=16, tasks_phase_s=4.0, tasks_rounds=2,
        )  # fmt: skip
    base = random_model(workdir / "bert-base", hidden=768, layers=12, heads=12, intermediate=3072)
    return Plan(
        suite, device, True, trainer_threads, label, minilm, compile,
        (TrainCase("all-MiniLM-L6-v2", minilm, 16, 64), TrainCase("BERT-base (random init)", base, 64, 128)),
        train_warmup_steps=20, train_window_s=10, train_bare_s=6, train_max_s=45, train_publish_interval_s=10,
        train_holdout=256,
        swap_repeats=100, swap_clients=8, swap_quiet_s=5, swap_phase_s=15,
        serve_clients=8, serve_busy_s=30, serve_idle_s=10, serve_event_rate=50,
        ingest_events=300_000, tasks_clients=64, tasks_phase_s=8.0, tasks_rounds=2,
    )  # fmt: skip
