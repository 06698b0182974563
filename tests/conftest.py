from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# `benchmarks` is not an installed package: the repository root makes it importable whichever way
# pytest is started (`pytest` puts no working directory on the path, `python -m pytest` does).
if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite computes in fp32 on every CPU, so its exact comparisons (1e-4 between the trainer's and the
# server's scores) hold on machines with and without native bf16; tests/test_precision.py covers
# model.autocast = on. Daemons the tests start inherit it.
os.environ.setdefault("DYNFT_MODEL__AUTOCAST", "off")

from dynft.devbroker import Broker
from dynft.settings import Settings
from dynft.trainer import OnlineTrainer

from helpers import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def tiny_settings(tiny_model_dir: Path, tmp_path: Path) -> Settings:
    """Settings for a fast run on the tiny model: high learning rates, small windows."""
    from dynft.settings import load_settings

    return load_settings(
        overrides={
            "state_dir": str(tmp_path / "state"),
            "model.path": str(tiny_model_dir),
            "model.max_length": 32,
            "trainer.lr": 1e-2,
            "trainer.head_lr": 3e-2,
            "trainer.warmup_steps": 5,
            "trainer.threads": 1,
            "trainer.fresh_wait_s": 0.05,
            "registry.publish_every_steps": 20,
            "run.status_interval_s": 1.0,
        }
    )


@pytest.fixture
def tiny_trainer(tiny_settings: Settings) -> OnlineTrainer:
    from dynft.trainer import build_trainer

    return build_trainer(tiny_settings.model, tiny_settings.adapter, tiny_settings.trainer)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A real single-node Kafka broker (KRaft, loopback, free port) for the whole test session."""
    from dynft import devbroker

    broker = devbroker.start(tmp_path_factory.mktemp("kafka"))
    try:
        yield broker
    finally:
        devbroker.stop(broker.data_dir)
