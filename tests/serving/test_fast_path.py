"""The fast path: a label no version knows is answered from its first events, over real sockets."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch

from dynft.events import Event
from dynft.registry import AdapterRegistry
from dynft.serving.labelmix import MIX_FILE, read_rates
from dynft.serving.prototypes import REFRESH_ROWS, SHOTS_FILE, FastPath, ShotLog, merge_columns, read_shots
from dynft.settings import Settings
from dynft.trainer import OnlineTrainer, build_trainer

from helpers import WORDS, keyword_events, write_jsonl
from serving.conftest import running_server, wait_for_version

SHOTS = 8


def publish_trained(trainer: OnlineTrainer, settings: Settings, labels: list[str], seed: int) -> int:
    """Train on a keyword stream of ``labels``, publish the result and make it serve."""
    stream = events_of(labels, 200, seed)
    random.Random(seed).shuffle(stream)
    for i in range(0, len(stream), 16):
        trainer.step(trainer.collator(stream[i : i + 16], n_fresh=16))
    registry = AdapterRegistry(settings.registry_dir, keep_last=10)
    version = registry.publish(trainer.export(), {"step": trainer.steps}).version
    registry.promote(version, "test")
    return version


def text_of(rng: random.Random, label: str) -> str:
    """A text of ``label``: its texts share one keyword (the random tiny model's features see words, not meanings)."""
    words = [rng.choice(WORDS) for _ in range(3)]
    words.insert(rng.randrange(4), f"{label}0")
    return " ".join(words)


def events_of(labels: list[str], n: int, seed: int) -> list[Event]:
    rng = random.Random(seed)
    return [Event(id=f"{seed}-{i}", text=text_of(rng, label), label=label) for i in range(n) for label in labels]


def hand_over(settings: Settings, labels: list[str], seed: int) -> None:
    """What the trainer's batching thread does: the first events of each label go to the shots file."""
    ShotLog(settings.state_dir / SHOTS_FILE, SHOTS).offer(events_of(labels, 20, seed))


def predict(client: httpx.Client, texts: list[str]) -> httpx.Response:
    return client.post("/v1/predict", json={"texts": texts})


def accuracy(client: httpx.Client, label: str, seed: int, n: int = 30) -> float:
    """The share of ``n`` new texts of ``label`` answered with it (one request: one version)."""
    rng = random.Random(seed)
    texts = [text_of(rng, label) for _ in range(n)]
    body = predict(client, texts).json()
    return sum(p["label"] == label for p in body["predictions"]) / n


def wait_for_fast_path(client: httpx.Client, text: str, timeout: float = 60.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = predict(client, [text])
        if r.status_code == 200 and r.json()["fast_path"]:
            body: dict[str, object] = r.json()
            return body
        time.sleep(0.05)
    raise AssertionError("the fast path never answered")


def test_a_label_no_version_knows_is_answered_from_its_first_events_until_a_version_learns_it(
    tiny_settings: Settings,
) -> None:
    assert tiny_settings.server.prototypes  # on by default
    tiny_settings.model.pooling = "mean"  # as the default MiniLM; a random [CLS] pooler is no feature
    tiny_trainer = build_trainer(tiny_settings.model, tiny_settings.adapter, tiny_settings.trainer)
    assert publish_trained(tiny_trainer, tiny_settings, ["alpha", "beta", "delta"], seed=1) == 1
    rng = random.Random(5)
    gamma = text_of(rng, "gamma")
    with running_server(tiny_settings) as (base, server), httpx.Client(base_url=base, timeout=30) as client:
        wait_for_version(base, 1)
        before = predict(client, [gamma]).json()
        assert before["fast_path"] is False and "gamma" not in before["predictions"][0]["scores"]
        known_before = [accuracy(client, label, seed=11) for label in ("alpha", "beta", "delta")]

        hand_over(tiny_settings, ["alpha", "beta", "delta", "gamma"], seed=2)
        body = wait_for_fast_path(client, gamma)
        assert body["adapter_version"] == 1  # the version answered, with prototype rows beside its head
        new = accuracy(client, "gamma", seed=12)
        known = [accuracy(client, label, seed=11) for label in ("alpha", "beta", "delta")]
        # Without the fast path the version answers 0% of them (it has no such label); a random tiny
        # model's features are weak, so the bar is well above chance (1/4), not near 100%.
        assert new >= 0.6, f"the new label was answered right for {new:.0%} of its texts"
        # The row costs the known labels a little (a prototype is cruder than a trained row), but
        # what users get over all four labels is better than without it.
        assert min(known) >= 0.6, f"known labels fell from {known_before} to {known}"
        assert sum(known) + new > sum(known_before) + 0.0 + 0.3
        answered = server.metrics_registry.get_sample_value("dynft_fast_path_answers_total") or 0
        assert answered >= 90

        assert publish_trained(tiny_trainer, tiny_settings, ["alpha", "beta", "delta", "gamma"], seed=3) == 2
        wait_for_version(base, 2)
        after = predict(client, [gamma]).json()
        assert after["fast_path"] is False  # the version knows gamma: its prototype retired
        assert sorted(after["predictions"][0]["scores"]) == ["alpha", "beta", "delta", "gamma"]
        learned = accuracy(client, "gamma", seed=12)
        assert learned >= 0.8


def test_before_the_first_version_prototypes_answer_instead_of_503(tiny_settings: Settings) -> None:
    tiny_settings.model.pooling = "mean"  # the untrained [CLS] pooler of a random model is no feature
    with running_server(tiny_settings) as (base, server), httpx.Client(base_url=base, timeout=30) as client:
        assert predict(client, ["w1 alpha0 w2"]).status_code == 503  # nothing to answer with yet
        hand_over(tiny_settings, ["alpha", "beta", "gamma"], seed=4)
        body = wait_for_fast_path(client, "w1 alpha0 w2")
        assert body["adapter_version"] == 0
        right = [accuracy(client, label, seed=13) for label in ("alpha", "beta", "gamma")]
        assert min(right) >= 0.6, f"cold-start accuracy per label {right}"
        assert not server.metrics_registry.get_sample_value("dynft_swaps_total")  # version 0 is no adapter version
        assert client.get("/readyz").status_code == 503  # nor is it ready: readiness waits for a real version


def test_the_shots_file_survives_restarts_and_cut_lines(tmp_path: Path) -> None:
    path = tmp_path / "run" / "shots.jsonl"
    events = [Event(**r) for r in keyword_events(60, ["alpha", "beta"], seed=9)]
    assert ShotLog(path, 3).offer(events[:2]) == 2
    with open(path, "ab") as fh:
        fh.write(b'{"label": "alpha", "te')  # a crash in the middle of a line
    assert [s.label for s in read_shots(path)[0]] == [e.label for e in events[:2]]
    again = ShotLog(path, 3)  # a restarted trainer counts what is there and drops the cut line
    assert sum(again.counts.values()) == 2
    assert again.offer(events) == 6 - 2
    assert again.offer(events) == 0  # every label has its shots
    shots, end = read_shots(path)
    assert end == path.stat().st_size and len(shots) == 6
    assert sorted(s.label for s in shots) == ["alpha"] * 3 + ["beta"] * 3

    fast = FastPath(path, 3)  # the server's side reads whole lines, each once
    fast.poll()
    fast.take()
    assert {label: len(texts) for label, texts in fast.shots.items()} == {"alpha": 3, "beta": 3}
    path.write_text("")  # a state reset: the server starts over
    fast.poll()
    fast.take()
    assert fast.shots == {}


def test_a_new_lineage_collects_shots_afresh_and_the_server_keeps_only_the_newest_lineages(
    tmp_path: Path,
) -> None:
    """After a concept change the old shots answer with the old concept: they are dropped."""
    path = tmp_path / "run" / "shots.jsonl"
    old = [Event(**r) for r in keyword_events(40, ["alpha", "beta"], seed=1)]
    swapped = {"alpha": "beta", "beta": "alpha"}
    new = [Event(**r) for r in keyword_events(40, ["alpha", "beta"], seed=2, relabel=swapped)]
    log = ShotLog(path, 3)
    assert log.offer(old) == 6
    fast = FastPath(path, 3)
    fast.poll()
    fast.take()
    assert fast.shots["alpha"] == [e.text for e in old if e.label == "alpha"][:3]

    assert log.offer(new, lineage=2) == 6  # the new lineage has no shots yet
    assert log.offer(old, lineage=2) == 0
    fast.poll()
    fast.take()
    assert fast.lineage == 2 and fast.shots["alpha"] == [e.text for e in new if e.label == "alpha"][:3]
    assert ShotLog(path, 3).counts == {"alpha": 3, "beta": 3}  # a restart counts the newest lineage's

    server = FastPath(path, 3)  # a restarted server reads the file from the start: the newest lineage's only
    server.poll()
    server.take()
    assert server.shots == fast.shots


def test_the_trainer_hands_the_first_events_of_each_label_to_the_shots_file(
    tiny_settings: Settings, tmp_path: Path
) -> None:
    from dynft.loop import TrainingLoop

    rows = keyword_events(120, ["alpha", "beta", "gamma"], seed=3)
    tiny_settings.source.uri = f"file:{write_jsonl(tmp_path / 'events.jsonl', rows)}"
    tiny_settings.source.exit_at_end = True
    tiny_settings.server.prototype_shots = 4
    TrainingLoop(tiny_settings).run()
    shots, _ = read_shots(tiny_settings.state_dir / SHOTS_FILE)
    texts = {row["text"]: row["label"] for row in rows}
    assert sorted(s.label for s in shots) == ["alpha"] * 4 + ["beta"] * 4 + ["gamma"] * 4
    assert all(texts[s.text] == s.label for s in shots)  # real events of the stream, with their labels
    mix = read_rates(tiny_settings.state_dir / MIX_FILE)  # and the label mix, for the prototype rows' prior
    # (whether it holds rates depends on how even the labels were when it was last written)
    assert mix is not None and mix.lineage == 1 and set(mix.rates) <= {"alpha", "beta", "gamma"}


def test_a_label_the_version_trained_on_fewer_events_than_its_shots_keeps_its_prototype_row(
    tiny_settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / SHOTS_FILE
    ShotLog(path, SHOTS).offer(events_of(["b"], 20, seed=1) + events_of(["c"], 3, seed=2))
    fast = FastPath(path, SHOTS)
    fast.poll()
    fast.take()
    assert fast.pending(["a", "b"], {"a": 50, "b": 2}) == ["b", "c"]  # b: 2 events < 8 shots
    assert fast.pending(["a", "b"], {"a": 50, "b": 8}) == ["c"]
    assert fast.pending(["a", "b"], None) == ["c"]  # a version without counts knows what it knows
    assert fast.pending(["a", "b", "c"], {"c": 2}) == ["c"]  # 2 events < the 3 shots c has
    assert fast.pending(["a", "b"], {"b": "junk"}) == ["c"]

    logits = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    labels, merged = merge_columns(["a", "b"], logits, ["b", "c"], torch.tensor([[5.0, 6.0], [7.0, 8.0]]))
    assert labels == ["a", "b", "c"]  # b's column is the prototype's, c is appended
    assert merged.tolist() == [[1.0, 5.0, 6.0], [3.0, 7.0, 8.0]] and logits.tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_a_version_of_an_older_lineage_gives_way_to_the_newer_shots_for_every_label(tmp_path: Path) -> None:
    path = tmp_path / SHOTS_FILE
    ShotLog(path, SHOTS).offer(events_of(["a", "b"], 20, seed=1), lineage=3)
    fast = FastPath(path, SHOTS)
    fast.poll()
    fast.take()
    trained = {"a": 50, "b": 50}
    assert fast.pending(["a", "b"], trained, lineage=2) == ["a", "b"]  # its rows answer the old concept
    assert fast.pending(["a", "b"], trained, lineage=3) == []  # a version of the shots' lineage knows them
    assert fast.pending(["a", "b"], trained, lineage=4) == []
    assert fast.pending(["a", "b"], trained, lineage=None) == []  # no lineage recorded: as before
    assert fast.pending(["a", "b"], trained, lineage="junk") == []


def test_after_a_concept_change_the_old_version_answers_the_new_concept_from_its_first_events(
    tiny_settings: Settings,
) -> None:
    """Until the new lineage's first version serves, the old one would answer every text by the old concept."""
    tiny_settings.model.pooling = "mean"  # as the default MiniLM; a random [CLS] pooler is no feature
    labels = ["alpha", "beta", "delta"]
    trainer = build_trainer(tiny_settings.model, tiny_settings.adapter, tiny_settings.trainer)
    stream = events_of(labels, 200, seed=1)
    random.Random(1).shuffle(stream)
    for i in range(0, len(stream), 16):
        trainer.step(trainer.collator(stream[i : i + 16], n_fresh=16))
    registry = AdapterRegistry(tiny_settings.registry_dir, keep_last=10)
    registry.promote(registry.publish(trainer.export(), {"step": trainer.steps, "lineage": 1}).version, "test")
    permuted = {"alpha": "beta", "beta": "delta", "delta": "alpha"}  # same inputs, new labels
    with running_server(tiny_settings) as (base, _), httpx.Client(base_url=base, timeout=30) as client:
        wait_for_version(base, 1)
        hand_over(tiny_settings, labels, seed=2)  # shots of the version's own lineage: nothing to add
        time.sleep(1.0)
        assert predict(client, ["w1 alpha0 w2"]).json()["fast_path"] is False
        old = [accuracy(client, label, seed=11) for label in labels]
        assert min(old) >= 0.8

        rng = random.Random(3)
        shots = [Event(id=f"n{i}-{x}", text=text_of(rng, x), label=permuted[x]) for i in range(20) for x in labels]
        ShotLog(tiny_settings.state_dir / SHOTS_FILE, SHOTS).offer(shots, lineage=2)
        body = wait_for_fast_path(client, "w1 alpha0 w2")
        assert body["adapter_version"] == 1  # still the old version, its rows replaced by prototypes
        texts = {x: [text_of(random.Random(12), x) for _ in range(30)] for x in labels}
        answered = {x: [p["label"] for p in predict(client, texts[x]).json()["predictions"]] for x in labels}
        new = [sum(a == permuted[x] for a in answered[x]) / 30 for x in labels]
        assert min(new) >= 0.6, f"the new concept was answered right for {new} of each input class"


def test_a_new_version_renews_earlier_shot_features_a_few_rows_per_forward(tmp_path: Path) -> None:
    """Re-embedding every shot at each version stalled a 2-core server on a class-incremental stream."""
    path = tmp_path / SHOTS_FILE
    ShotLog(path, SHOTS).offer(events_of(["b", "c", "e"], 8, seed=1))  # 24 shots: more than REFRESH_ROWS
    fast = FastPath(path, SHOTS)
    fast.poll()
    fast.take()
    head = torch.nn.Linear(4, 1)
    embedded: list[int] = []

    def embed_with(offset: float) -> Callable[[list[str]], torch.Tensor]:
        def embed(texts: list[str]) -> torch.Tensor:  # a feature per text that depends on the version
            embedded.append(len(texts))
            return torch.tensor([[float(len(t)), 1.0, 0.0, offset] for t in texts])

        return embed

    def prototype_offsets(version: object, offset: float) -> list[float]:
        return [round(x, 3) for x in fast._prototypes(version, ["b", "c", "e"], embed_with(offset))[:, 3].tolist()]

    first, second = object(), object()
    assert prototype_offsets(first, 1.0) == [1.0, 1.0, 1.0] and embedded == [24]  # every shot is new
    assert fast.extend(first, ["a"], head, torch.zeros(2, 4), embed_with(1.0))[0] == ["b", "c", "e"]
    assert embedded == [24]  # the same version: nothing embedded again
    embedded.clear()
    # A new version: 16 of the 24 rows are renewed per forward, the rest serve as they were meanwhile.
    assert prototype_offsets(second, 2.0) == [2.0, 2.0, 1.0]
    assert prototype_offsets(second, 2.0) == [2.0, 2.0, 2.0]
    assert prototype_offsets(second, 2.0) == [2.0, 2.0, 2.0] and embedded == [REFRESH_ROWS, 8]
    ShotLog(path, SHOTS).offer(events_of(["d"], 2, seed=3))  # a new label's shots are embedded at once
    fast.poll()
    fast.take()
    features = fast._prototypes(object(), ["b", "c", "d"], embed_with(3.0))
    assert features[:, 3].tolist() == pytest.approx([3.0, 3.0, 3.0]) and embedded[-1] == 2 + REFRESH_ROWS


def test_versions_record_the_events_trained_per_label_and_a_new_lineage_starts_them_again(
    tiny_settings: Settings, tiny_trainer: OnlineTrainer
) -> None:
    from prometheus_client import CollectorRegistry

    from dynft.evaluation import HoldoutWindow
    from dynft.metrics import TrainerMetrics
    from dynft.publisher import Publisher

    registry = AdapterRegistry(tiny_settings.registry_dir)
    publisher = Publisher(registry, tiny_trainer, HoldoutWindow(64), tiny_settings, TrainerMetrics(CollectorRegistry()))
    batch = events_of(["x", "y"], 6, seed=3) + events_of(["x"], 4, seed=4)  # x: 10, y: 6
    tiny_trainer.step(tiny_trainer.collator(batch, n_fresh=len(batch)))
    publisher.trained(1.0, batch)
    first = publisher.maybe_publish({}, force=True)
    assert registry.meta(first or 0)["label_events"] == {"x": 10, "y": 6}
    assert publisher.snapshot()["label_events"] == {"x": 10, "y": 6}  # a restart keeps them
    publisher.new_lineage()  # a retire: the head starts afresh
    tiny_trainer.step(tiny_trainer.collator(batch[:2], n_fresh=2))
    publisher.trained(2.0, batch[:2])
    second = publisher.maybe_publish({}, force=True)
    assert registry.meta(second or 0)["label_events"] == {"x": 1, "y": 1}
