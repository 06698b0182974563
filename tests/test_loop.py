from __future__ import annotations

import itertools
import json
import threading
from pathlib import Path

from prometheus_client import CollectorRegistry

from dynft.deadletter import read_dead_letters
from dynft.loop import TrainingLoop
from dynft.registry import AdapterRegistry
from dynft.settings import Settings

from helpers import keyword_events, write_jsonl
from test_events import BAD, LIMITS


def run(settings: Settings, path: Path, registry: CollectorRegistry | None = None) -> TrainingLoop:
    settings.source.uri = f"file:{path}"
    settings.source.exit_at_end = True
    loop = TrainingLoop(settings, registry)
    thread = threading.Thread(target=loop.run)
    thread.start()
    thread.join(timeout=180)
    assert not thread.is_alive()
    return loop


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_every_kind_of_bad_event_is_dead_lettered_counted_and_training_goes_on(
    tiny_settings: Settings, tmp_path: Path
) -> None:
    good = keyword_events(1200, ["alpha", "beta"], seed=7)
    bad = list(BAD.items())
    rows: list[object] = []
    for i, row in enumerate(good):  # bad records spread through the stream
        rows.append(row)
        if i % 80 == 0 and bad:
            rows.append(bad.pop()[1])
    rows.extend(raw for _, raw in bad)
    tiny_settings.events = LIMITS.model_copy()  # the limits the BAD records were made for
    metrics = CollectorRegistry()
    loop = run(tiny_settings, write_jsonl(tmp_path / "mixed.jsonl", rows), metrics)

    letters = read_dead_letters(tiny_settings.dead_letter_path)
    assert sorted(e["reason"] for e in letters) == sorted(BAD)
    for entry in letters:
        assert entry["raw_bytes"] == BAD[entry["reason"]]  # byte for byte, with its reason
        assert entry["origin"]["line"] >= 1 and entry["source"].startswith("file:")
    for reason in BAD:
        assert sample(metrics, "dynft_events_rejected_total", reason=reason) == 1
    assert sample(metrics, "dynft_events_total", outcome="dead_lettered") == len(BAD)
    trained = sample(metrics, "dynft_events_total", outcome="trained")
    held_out = sample(metrics, "dynft_events_total", outcome="held_out")
    assert trained + held_out == len(good)
    assert loop.trainer.steps > 30
    assert loop.prequential.accuracy > 0.8  # it kept learning through the garbage
    assert AdapterRegistry(tiny_settings.registry_dir).versions()


def test_versions_are_published_gated_and_resumed(tiny_settings: Settings, tmp_path: Path) -> None:
    rows = keyword_events(1500, ["alpha", "beta", "gamma"], seed=8)
    tiny_settings.registry.keep_last = 100  # every version stays, the first (cold start, step 3) included
    loop = run(tiny_settings, write_jsonl(tmp_path / "a.jsonl", rows))
    registry = AdapterRegistry(tiny_settings.registry_dir)
    versions = registry.versions()
    assert len(versions) >= 3
    metas = [registry.meta(v) for v in versions]
    assert metas[0]["gate"]["decision"] == "promoted" and metas[0]["parent"] is None
    for earlier, later in itertools.pairwise(metas):
        assert later["parent"] == earlier["version"] and later["step"] > earlier["step"]
        gate = later["gate"]
        if gate["decision"] == "promoted":
            assert gate["candidate_accuracy"] >= gate["serving_accuracy"] - tiny_settings.gate.tolerance
    serving = registry.serving().version
    assert serving is not None and registry.meta(serving)["gate"]["decision"] == "promoted"
    labels = json.loads((registry.path(versions[-1]) / "labels.json").read_text())
    assert sorted(labels) == ["alpha", "beta", "gamma"]

    # A restart continues from the newest version instead of starting over.
    more = keyword_events(200, ["alpha", "beta", "gamma"], seed=9, prefix="m")
    again = run(tiny_settings, write_jsonl(tmp_path / "b.jsonl", more))
    assert again.prequential.seen > 150
    assert again.prequential.accuracy > 0.8, "a resumed trainer predicts well from its first events"
    first_new = min(v for v in registry.versions() if v > versions[-1])
    assert registry.meta(first_new)["parent"] == versions[-1]
    assert loop.publisher.lineage == again.publisher.lineage
