"""The server answers with a version's adapter blended with its word counts (dynft.lexical)."""

from __future__ import annotations

import time
from concurrent.futures import Future

import httpx
import pytest
from prometheus_client import CollectorRegistry

from dynft.lexical import WEIGHTS, Lexicon
from dynft.metrics import ServerMetrics
from dynft.model import grow_head
from dynft.registry import AdapterRegistry
from dynft.serving.answers import Answer
from dynft.serving.engine import InferenceEngine
from dynft.settings import Settings
from dynft.tasks import task_registry_dir
from dynft.trainer import OnlineTrainer

from serving.conftest import reference_outputs, running_server

TEXTS = ["zebra zebra", "yak", "neither word"]


def publish_with_counts(settings: Settings, trainer: OnlineTrainer, weight: float) -> dict[str, list[float]]:
    """Version 1: the untrained adapter with labels a and b, and counts that know zebra as b and
    yak as a, blended at ``weight``; returns what the counts alone say of each text."""
    trainer.label_map.ids(["a", "b"])
    trainer.imprinted = 2
    grow_head(trainer.model, 2, trainer.optimizer)
    lexicon = Lexicon(settings.trainer.lexical_buckets)
    lexicon.learn(["zebra zebra", "zebra", "yak yak"], [1, 1, 0], labels=2)
    lexicon.losses = (WEIGHTS - weight).abs()  # lowest at ``weight``
    state = trainer.export()
    state.lexical = lexicon.state(2)
    registry = AdapterRegistry(settings.registry_dir)
    registry.promote(registry.publish(state, {}).version, "test")
    return {text: lexicon.probabilities([text], 2)[0].tolist() for text in TEXTS}


@pytest.mark.parametrize("blend_on", [True, False])
def test_answers_are_the_adapters_and_the_counts_mixture_as_the_version_weighs_them(
    tiny_settings: Settings, tiny_trainer: OnlineTrainer, blend_on: bool
) -> None:
    counts = publish_with_counts(tiny_settings, tiny_trainer, weight=0.3)
    tiny_settings.trainer.lexical_blend = blend_on  # the server's switch: off, versions answer as adapters alone
    registry = AdapterRegistry(tiny_settings.registry_dir)
    adapter = reference_outputs(tiny_settings, {1: registry.load(1)[0]}, TEXTS[0])[1]
    with running_server(tiny_settings) as (base, _):
        deadline = time.monotonic() + 60
        while True:
            r = httpx.post(f"{base}/v1/predict", json={"texts": TEXTS}, timeout=30)
            if (r.status_code == 200 and r.json()["adapter_version"] == 1) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        body = r.json()
    assert body["adapter_version"] == 1 and body["fast_path"] is False
    scores = [p["scores"] for p in body["predictions"]]
    if blend_on:
        want = [0.3 * adapter["a"] + 0.7 * counts[TEXTS[0]][0], 0.3 * adapter["b"] + 0.7 * counts[TEXTS[0]][1]]
        assert [scores[0]["a"], scores[0]["b"]] == pytest.approx(want, abs=1e-5)
        assert [p["label"] for p in body["predictions"][:2]] == ["b", "a"]  # the counts outweigh an untrained head
    else:
        assert [scores[0]["a"], scores[0]["b"]] == pytest.approx([adapter["a"], adapter["b"]], abs=1e-5)


def test_a_batch_of_two_tasks_blends_each_row_with_its_own_tasks_counts(
    tiny_settings: Settings, tiny_trainer: OnlineTrainer
) -> None:
    """The mixed-task pass (one encoder pass for every task's rows) blends row by row."""
    default_counts = publish_with_counts(tiny_settings, tiny_trainer, weight=0.0)  # the counts alone
    lexicon = Lexicon(tiny_settings.trainer.lexical_buckets)
    lexicon.learn(["zebra", "yak"], [0, 1], labels=2)  # the other way round, under other names
    lexicon.losses = WEIGHTS.clone()  # lowest at a share of 0
    state = tiny_trainer.export()
    state.labels, state.lexical = ["x", "y"], lexicon.state(2)
    other = AdapterRegistry(task_registry_dir(tiny_settings.registry_dir, "other"))
    other.promote(other.publish(state, {"task": "other"}).version, "test")
    metrics = ServerMetrics(CollectorRegistry())
    engine = InferenceEngine(tiny_settings, AdapterRegistry(tiny_settings.registry_dir), metrics)
    engine.poll_registry()
    queued: list[tuple[str, Future[Answer]]] = [(task, engine.submit(TEXTS[:2], task)) for task in ("default", "other")]
    engine.start()
    try:
        answers = {task: future.result(timeout=60) for task, future in queued}
    finally:
        engine.stop()
    samples = next(iter(metrics.batch_size.collect())).samples
    passes = {s.name: s.value for s in samples}["dynft_predict_batch_texts_count"]
    assert passes == 1  # both tasks' rows in one mixed pass
    assert [p.label for p in answers["default"].predictions] == ["b", "a"]
    assert [p.label for p in answers["other"].predictions] == ["x", "y"]
    assert answers["default"].predictions[0].scores["b"] == pytest.approx(default_counts[TEXTS[0]][1], abs=1e-5)
