"""Many tasks served by one base model: mixed-task batches, per-task swaps, the task API."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import httpx
import pytest
from prometheus_client import CollectorRegistry

from dynft.metrics import ServerMetrics
from dynft.model import AdapterState
from dynft.registry import AdapterRegistry
from dynft.serving.answers import Answer
from dynft.serving.engine import InferenceEngine
from dynft.settings import Settings
from dynft.tasks import task_registry_dir
from dynft.trainer import OnlineTrainer

from serving.conftest import PROBE, TOKEN, perturbed, reference_outputs, running_server

OTHER = "w3 gamma1 w5 delta0 beta2"
TEXTS = [PROBE, OTHER, "w1 w2 alpha3"]


@pytest.fixture
def intents(
    versions: dict[int, AdapterState], tiny_settings: Settings, tiny_trainer: OnlineTrainer
) -> dict[int, AdapterState]:
    """Versions 1-5 of task ``intents``: other labels, and answers that differ from every default version."""
    registry = AdapterRegistry(task_registry_dir(tiny_settings.registry_dir, "intents"), keep_last=100)
    head_keys = tiny_trainer.slots.head_keys
    out = {}
    for k in range(1, 6):
        state = perturbed(versions[25], -7 * k, head_keys)
        state = AdapterState(state.tensors, ["i-one", "i-two", "i-three"], state.peft_config)
        assert registry.publish(state, {"step": k, "task": "intents"}).version == k
        out[k] = state
    return out


def references(settings: Settings, states: dict[int, AdapterState]) -> dict[str, dict[int, dict[str, float]]]:
    return {text: reference_outputs(settings, states, text) for text in TEXTS}


def close(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-5 for k in a)


def test_a_batch_that_mixes_tasks_answers_each_row_as_its_own_task_would(
    tiny_settings: Settings, versions: dict[int, AdapterState], intents: dict[int, AdapterState]
) -> None:
    AdapterRegistry(tiny_settings.registry_dir, keep_last=100).promote(13, "start")
    AdapterRegistry(task_registry_dir(tiny_settings.registry_dir, "intents")).promote(2, "start")
    expected = {
        "default": references(tiny_settings, {13: versions[13]}),
        "intents": references(tiny_settings, {2: intents[2]}),
    }
    for text in TEXTS:  # the two tasks' versions answer differently (or the test could not tell them apart)
        assert list(expected["default"][text][13].values()) != pytest.approx(
            list(expected["intents"][text][2].values())
        )

    engine = InferenceEngine(
        tiny_settings, AdapterRegistry(tiny_settings.registry_dir), ServerMetrics(CollectorRegistry())
    )
    engine.poll_registry()  # stages both tasks' serving versions; the worker is not running yet
    queued: list[tuple[str, list[str], Future[Answer]]] = []
    for i in range(6):  # queued before the worker starts: they are answered in one micro-batch
        task, texts = ("intents" if i % 2 else "default"), TEXTS[i % 3 :] + TEXTS[: i % 3]
        queued.append((task, texts, engine.submit(texts, task)))
    batches = engine.metrics.batch_size
    engine.start()
    try:
        answers = [(task, texts, future.result(timeout=60)) for task, texts, future in queued]
    finally:
        engine.stop()
    passes = {s.name: s.value for s in batches.collect()[0].samples}["dynft_predict_batch_texts_count"]
    assert passes == 1  # one encoder pass over the mixed batch, each row with its own task's adapter and head
    for task, texts, answer in answers:
        assert answer.version == (13 if task == "default" else 2)
        for text, prediction in zip(texts, answer.predictions, strict=True):
            want = expected[task][text][answer.version]
            assert close(prediction.scores, want), (task, text, prediction.scores, want)
            assert prediction.label == max(want, key=want.__getitem__)


def test_swapping_one_task_under_load_changes_no_answer_of_another(
    tiny_settings: Settings, versions: dict[int, AdapterState], intents: dict[int, AdapterState]
) -> None:
    registry = AdapterRegistry(tiny_settings.registry_dir, keep_last=100)
    registry.promote(1, "start")
    AdapterRegistry(task_registry_dir(tiny_settings.registry_dir, "intents"), keep_last=100).promote(3, "start")
    default_expected = reference_outputs(tiny_settings, versions, PROBE)
    intents_expected = reference_outputs(tiny_settings, {3: intents[3]}, PROBE)[3]
    order = [5, 13, 2, 25, 9, 18, 1]  # the head grows and shrinks again
    with running_server(tiny_settings) as (base, server):
        wait_for_task(base, "default", 1)
        wait_for_task(base, "intents", 3)
        failures: list[str] = []
        answers: dict[str, list[tuple[int, dict[str, float]]]] = {"default": [], "intents": []}
        done = threading.Event()

        def client(task: str) -> None:
            with httpx.Client(base_url=base, timeout=30) as http:
                while not done.is_set():
                    r = http.post("/v1/predict", json={"texts": [PROBE, OTHER], "task": task})
                    if r.status_code != 200:
                        failures.append(f"{task}: {r.status_code} {r.text}")
                        continue
                    body = r.json()
                    answers[task].append((body["adapter_version"], body["predictions"][0]["scores"]))

        def swapper() -> None:  # task default only; each swap is seen served before the next
            try:
                for version in order:
                    registry.promote(version, "swap test")
                    wait_for_task(base, "default", version, timeout=120)
            finally:
                done.set()

        threads = [threading.Thread(target=client, args=(t,)) for t in ("default", "intents") * 3]
        swapping = threading.Thread(target=swapper)
        swapping.start()
        for t in threads:
            t.start()
        swapping.join(900)
        for t in threads:
            t.join(60)
        swaps = server.metrics_registry.get_sample_value("dynft_swaps_total") or 0

    assert failures == []
    assert swaps == 2 + len(order)  # each task's first version, then every swap of the default task
    assert {v for v, _ in answers["intents"]} == {3}
    for version, scores in answers["intents"]:
        assert close(scores, intents_expected), (version, scores)
    for version, scores in answers["default"]:
        assert close(scores, default_expected[version]), (version, scores)


def wait_for_task(base: str, task: str, version: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=base) as client:
        while time.monotonic() < deadline:
            r = client.post("/v1/predict", json={"texts": [PROBE], "task": task})
            if r.status_code == 200 and r.json()["adapter_version"] == version:
                return
            time.sleep(0.02)
    raise AssertionError(f"task {task} never answered with version {version}")


def test_a_daemon_of_named_tasks_alone_is_ready_once_one_serves(
    tiny_settings: Settings, versions: dict[int, AdapterState], intents: dict[int, AdapterState]
) -> None:
    """Found by a review: ``/readyz`` looked at the default task only, so a daemon whose events all
    name tasks answered 503 for ever, and a readiness probe never sent it traffic."""
    with running_server(tiny_settings) as (base, _), httpx.Client(base_url=base, timeout=30) as http:
        assert http.get("/readyz").status_code == 503
        AdapterRegistry(task_registry_dir(tiny_settings.registry_dir, "intents")).promote(2, "start")
        wait_for_task(base, "intents", 2)
        assert http.get("/readyz").json() == {"status": "ready", "adapter_version": None, "tasks": {"intents": 2}}


def test_the_task_api_lists_tasks_and_administers_each_alone(
    tiny_settings: Settings, versions: dict[int, AdapterState], intents: dict[int, AdapterState]
) -> None:
    AdapterRegistry(tiny_settings.registry_dir, keep_last=100).promote(13, "start")
    AdapterRegistry(task_registry_dir(tiny_settings.registry_dir, "intents")).promote(1, "start")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with running_server(tiny_settings) as (base, _), httpx.Client(base_url=base, timeout=30) as http:
        wait_for_task(base, "intents", 1)
        r = http.post("/v1/predict", json={"texts": [PROBE], "task": "nope"})
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "unknown_task"
        assert "default, intents" in r.json()["error"]["message"]

        tasks = {t["task"]: t for t in http.get("/v1/tasks").json()["tasks"]}
        assert tasks["default"]["labels"] == ["alpha", "beta", "gamma"] and tasks["default"]["loaded"] == 13
        assert tasks["intents"]["labels"] == ["i-one", "i-two", "i-three"] and tasks["intents"]["serving"] == 1
        body = http.post("/v1/predict", json={"texts": [PROBE], "task": "intents"}).json()
        assert body["task"] == "intents" and set(body["predictions"][0]["scores"]) == {"i-one", "i-two", "i-three"}

        assert http.post("/v1/adapters/4/promote", params={"task": "intents"}, headers=auth).status_code == 200
        wait_for_task(base, "intents", 4)
        listing = http.get("/v1/adapters", params={"task": "intents"}).json()
        assert listing["serving"] == 4 and [v["version"] for v in listing["versions"]] == [1, 2, 3, 4, 5]
        assert http.get("/v1/adapters").json()["serving"] == 13  # the default task is untouched
        assert http.post("/v1/adapters/rollback", params={"task": "intents"}, headers=auth).json()["serving"] == 1
        assert http.get("/v1/adapters", params={"task": "nope"}).status_code == 404
