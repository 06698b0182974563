"""Routing: the label cap, ``internal`` for what no rule foresaw, the tokenizer fallback, sinks and
ledger that store any record, and skipped steps that keep their events out of replay."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from dynft import routing
from dynft.batching import Collator, LabelMap
from dynft.cli import main
from dynft.deadletter import JsonlDeadLetterSink, read_dead_letters
from dynft.evaluation import is_held_out
from dynft.events import Event, Rejection
from dynft.ledger import Ledger
from dynft.loop import TrainingLoop
from dynft.metrics import TrainerMetrics
from dynft.model import load_tokenizer
from dynft.routing import Router
from dynft.settings import Settings
from dynft.sources import Record

from helpers import keyword_events, write_jsonl


def raw(event_id: str, label: str = "a", text: str = "w1 alpha1") -> bytes:
    return json.dumps({"id": event_id, "text": text, "label": label}).encode()


def records(raws: Sequence[bytes]) -> list[Record]:
    return [Record(r, "file:t.jsonl", n) for n, r in enumerate(raws, 1)]


def make_router(
    tmp_path: Path, capacity: int | None = None, holdout: float = 0.0, metrics: CollectorRegistry | None = None
) -> Router:
    settings = Settings()
    settings.evaluation.holdout_fraction = holdout
    sink = JsonlDeadLetterSink(tmp_path / "dead.jsonl", "file:t.jsonl")
    return Router(settings, LabelMap(capacity=capacity), sink, TrainerMetrics(metrics or CollectorRegistry()))


def ids_where(held_out: bool, fraction: float, n: int) -> list[str]:
    """``n`` ids whose events (text ``w1 alpha1``) are held out, or not, at ``fraction``."""
    return [i for i in (f"id{k}" for k in range(1000)) if is_held_out(i, "w1 alpha1", fraction) == held_out][:n]


def test_a_label_beyond_max_labels_is_dead_lettered_and_known_labels_go_on(tmp_path: Path) -> None:
    router = make_router(tmp_path, capacity=2)
    routed = router.route(records([raw("1", "a"), raw("2", "b"), raw("3", "c"), raw("4", "a"), raw("5", "d")]))
    assert [e.id for _, e in routed.fresh] == ["1", "2", "4"]
    assert [key for _, key in routed.dead] == ["3", "5"]  # ledger keys: their ids
    assert router.labels.labels == ["a", "b"]
    letters = read_dead_letters(tmp_path / "dead.jsonl")
    assert [(e["reason"], json.loads(e["raw"])["id"]) for e in letters] == [
        ("too_many_labels", "3"),
        ("too_many_labels", "5"),
    ]
    assert "trainer.max_labels=2" in letters[0]["detail"]


def test_a_teacher_beyond_max_labels_is_named_with_the_labels_it_brings(tmp_path: Path) -> None:
    """A review found "label 'tl0' would be label 15" for a teacher of 2,000 new labels: the count
    and the labels named are the ones the record brings, whichever field brings them."""
    router = make_router(tmp_path, capacity=4)
    teacher = {f"t{i}": 0.25 for i in range(4)}
    taught = json.dumps({"id": "t", "text": "w1 alpha1", "label": "a", "teacher": teacher}).encode()
    routed = router.route(records([raw("1", "a"), raw("2", "b"), taught, raw("3", "c")]))
    assert [e.id for _, e in routed.fresh] == ["1", "2", "3"] and [k for _, k in routed.dead] == ["t"]
    (letter,) = read_dead_letters(tmp_path / "dead.jsonl")
    assert letter["detail"] == (
        "the label and its teacher bring 4 new labels ('t0', 't1', 't2', ...): 2 + 4 > trainer.max_labels=4"
    )


def taught(event_id: str, labels: int, task: str | None = None) -> bytes:
    teacher = {f"t{i}": 1 / labels for i in range(labels)}
    row = {"id": event_id, "text": "w1 alpha1", "teacher": teacher} | ({"task": task} if task else {})
    return json.dumps(row).encode()


def test_a_task_whose_events_are_all_refused_takes_no_place(tmp_path: Path) -> None:
    """Found by a probe: two records of throwaway tasks, each refused (a teacher of more labels
    than the cap), took the only free places of ``tasks.max_tasks``, and every later record of a
    real task was refused (until a restart, which forgot them). A task is admitted with its first
    event that passes every check."""
    settings = Settings()
    settings.tasks.max_tasks = 2  # the default task and one more
    sink = JsonlDeadLetterSink(tmp_path / "dead.jsonl", "file:t.jsonl")
    router = Router(settings, LabelMap(capacity=3), sink, TrainerMetrics(CollectorRegistry()))
    real = json.dumps({"id": "r", "text": "w1 alpha1", "label": "a", "task": "real"}).encode()
    routed = router.route(records([taught("j1", 5, "junk1"), taught("j2", 5, "junk2"), real]))
    assert [e.id for _, e in routed.fresh] == ["r"] and [key for _, key in routed.dead] == ["j1", "j2"]
    assert router.tasks.names() == ["default", "real"]
    assert [e["reason"] for e in read_dead_letters(tmp_path / "dead.jsonl")] == ["too_many_labels"] * 2


def test_a_held_out_event_whose_teacher_brings_too_many_labels_is_refused_as_a_trained_one_is(
    tmp_path: Path,
) -> None:
    """Found by a probe: of two such records one was refused and the other, held out by its id's
    hash, was kept (its teacher's labels were not counted)."""
    router = make_router(tmp_path, capacity=3, holdout=0.5)
    trained, held = ids_where(False, 0.5, 1)[0], ids_where(True, 0.5, 2)
    routed = router.route(records([taught(trained, 5), taught(held[0], 5), taught(held[1], 3)]))
    assert [key for _, key in routed.dead] == [trained, held[0]]
    assert [e.id for _, e in routed.held_out] == [held[1]] and router.labels.labels == []  # fits, adds none


def test_a_cut_over_long_line_is_dead_lettered_with_its_real_length(tmp_path: Path) -> None:
    """The file source hands on only the first ``max_record_bytes + 1`` bytes of a long line; the
    detail gives the line's length the source measured, not the prefix's."""
    router = make_router(tmp_path)
    limit = router.limits.max_record_bytes
    record = Record(b"x" * (limit + 1), "file:t.jsonl", 1, None, {"line": 1, "offset": 0, "bytes": 52_428_855})
    routed = router.route([record])
    assert len(routed.dead) == 1
    assert read_dead_letters(tmp_path / "dead.jsonl")[0]["detail"] == f"52428855 bytes > {limit}"


def test_held_out_events_with_a_label_beyond_max_labels_are_dead_lettered(tmp_path: Path) -> None:
    router = make_router(tmp_path, capacity=1, holdout=0.5)
    trained, held = ids_where(False, 0.5, 1), ids_where(True, 0.5, 3)
    routed = router.route(records([raw(trained[0], "a"), raw(held[0], "a"), raw(held[1], "zz"), raw(held[2], "a")]))
    assert [e.id for _, e in routed.held_out] == [held[0], held[2]]
    assert [key for _, key in routed.dead] == [held[1]]
    assert read_dead_letters(tmp_path / "dead.jsonl")[0]["reason"] == "too_many_labels"
    assert router.labels.labels == ["a"]  # held-out events never add labels


def test_a_held_out_event_with_a_new_label_within_the_cap_is_kept_but_adds_no_label(tmp_path: Path) -> None:
    router = make_router(tmp_path, capacity=5, holdout=0.5)
    held = ids_where(True, 0.5, 1)
    routed = router.route(records([raw(held[0], "new")]))
    assert [e.label for _, e in routed.held_out] == ["new"] and router.labels.labels == []


def test_an_exception_no_rule_foresaw_dead_letters_only_its_record_as_internal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Injected: no real record makes decode raise any more (that is the point of this work), so
    # the unforeseen exception is produced by wrapping decode for one record.
    real = routing.decode

    def flaky(data: bytes, limits: object) -> Event | Rejection:
        if b"boom" in data:
            raise ZeroDivisionError("division by zero in a rule nobody wrote")
        return real(data, limits)  # type: ignore[arg-type]

    monkeypatch.setattr(routing, "decode", flaky)
    metrics = CollectorRegistry()
    router = make_router(tmp_path, metrics=metrics)
    routed = router.route(records([raw("1"), raw("boom"), raw("3")]))
    assert [e.id for _, e in routed.fresh] == ["1", "3"]
    assert [key for _, key in routed.dead] == ["@file:t.jsonl:2"]  # decode never gave it an id
    (letter,) = read_dead_letters(tmp_path / "dead.jsonl")
    assert letter["reason"] == "internal" and letter["detail"].startswith("ZeroDivisionError: ")
    assert letter["raw_bytes"] == raw("boom")
    assert metrics.get_sample_value("dynft_events_rejected_total", {"reason": "internal"}) == 1


class PoisonedCollator(Collator):
    """Injected: a tokenizer that fails on one text. Real tokenizers take every string decode lets
    through (the property test checks that), so the fault cannot be produced for real."""

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if any("poison" in t for t in texts):
            raise RuntimeError("tokenizer failed")
        return super().encode(texts)


def test_a_batch_that_fails_to_tokenize_dead_letters_only_the_culprit(tmp_path: Path, tiny_model_dir: Path) -> None:
    router = make_router(tmp_path)
    collator = PoisonedCollator(load_tokenizer(tiny_model_dir), 16, router.labels)
    routed = router.route(records([raw("1"), raw("2", text="poison w1"), raw("3", "b")]))
    replayed = [Event(id="r", text="w2 beta1", label="b")]
    batch, dead = router.collate(collator, routed.fresh, replayed)
    assert batch is not None
    assert [e.id for e in batch.events] == ["1", "3", "r"] and batch.n_fresh == 2
    assert batch.input_ids.shape[0] == 3 and batch.labels.tolist() == [0, 1, 1]
    assert [key for _, key in dead] == ["2"]
    (letter,) = read_dead_letters(tmp_path / "dead.jsonl")
    assert (letter["reason"], letter["detail"]) == ("internal", "RuntimeError: tokenizer failed")


def test_a_held_out_event_that_fails_to_tokenize_is_dead_lettered_before_the_gate_sees_it(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    router = make_router(tmp_path, holdout=0.5)
    collator = PoisonedCollator(load_tokenizer(tiny_model_dir), 16, router.labels)
    held = ids_where(True, 0.5, 2)
    routed = router.route(records([raw(held[0], text="poison w1"), raw(held[1])]))
    kept, dead = router.screen(collator, routed.held_out)
    assert [e.id for e in kept] == [held[1]] and [key for _, key in dead] == [held[0]]
    assert read_dead_letters(tmp_path / "dead.jsonl")[0]["reason"] == "internal"


def test_a_batch_of_culprits_only_is_no_batch(tmp_path: Path, tiny_model_dir: Path) -> None:
    router = make_router(tmp_path)
    collator = PoisonedCollator(load_tokenizer(tiny_model_dir), 16, router.labels)
    batch, dead = router.collate(collator, router.route(records([raw("p", text="poison")])).fresh, [])
    assert batch is None and [key for _, key in dead] == ["p"]


def test_the_jsonl_sink_stores_surrogates_in_source_stream_and_detail(tmp_path: Path) -> None:
    source = "file:caf\udce9.jsonl"  # a file name that is not UTF-8, as Python hands it over
    sink = JsonlDeadLetterSink(tmp_path / "dead.jsonl", source)
    sink.write(Rejection("not_utf8", "invalid UTF-8 at byte 3", b"caf\xe9"), Record(b"caf\xe9", source, 1))
    sink.flush()
    (entry,) = read_dead_letters(tmp_path / "dead.jsonl")
    assert (entry["source"], entry["origin"]["stream"], entry["raw_bytes"]) == (source, source, b"caf\xe9")


def test_the_ledger_stores_and_finds_ids_with_lone_surrogates(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.record([("@file:caf\udce9.jsonl:3", "dead_lettered"), ("plain", "trained")])
    ledger.commit()
    assert ledger.lookup(["@file:caf\udce9.jsonl:3", "plain"]) == {
        "@file:caf\udce9.jsonl:3": ("dead_lettered", 1),
        "plain": ("trained", 1),
    }


def test_dynft_ledger_finds_an_id_with_a_lone_surrogate_as_it_was_recorded(tmp_path: Path) -> None:
    key = "@file:caf\udce9.jsonl:3"  # how Python hands over a name that is not UTF-8 (surrogateescape)
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.record([(key, "dead_lettered")])
    ledger.commit()
    ledger.close()
    result = CliRunner().invoke(main, ["ledger", "--state-dir", str(tmp_path), key, "other"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert lines == [{"id": key, "status": "dead_lettered", "seen": 1}, {"id": "other", "status": "unseen", "seen": 0}]


class Unstorable(str):
    """Injected: an id that passes as ASCII but is not encodable; decode and the ledger's escaping
    keep every real id storable, so a failure other than sqlite3.Error cannot be produced for real."""

    def isascii(self) -> bool:
        return True


def test_the_ledger_rolls_back_on_any_exception_and_keeps_the_outcomes(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.record([("a", "trained"), (Unstorable("b\ud800"), "trained")])
    with pytest.raises(UnicodeEncodeError):
        ledger.commit()
    assert not ledger._db.in_transaction  # the next BEGIN works
    assert ledger.counts()["trained"] == 0  # "a" was rolled back with the rest...
    ledger.discard()  # ...and kept pending until dropped
    ledger.record([("c", "trained")])
    ledger.commit()
    assert ledger.lookup(["a", "c"]) == {"a": ("unseen", 0), "c": ("trained", 1)}


def test_a_step_skipped_for_one_poisoned_event_does_not_poison_later_steps(
    tiny_settings: Settings, tmp_path: Path
) -> None:
    """A weight beyond float32 makes its step's loss non-finite; the step is skipped and its
    events stay out of the replay buffer, so later steps, which replay from it, are not skipped."""
    rows: list[object] = list(keyword_events(300, ["alpha", "beta"], seed=3))
    # Alone in its class, the poison would be drawn by a third of all class-balanced replay draws.
    poisoned = {"id": "poison", "text": "w1 omega1 w2", "label": "omega", "weight": 1e39}
    rows.insert(40, poisoned)
    tiny_settings.events.max_weight = 1e308  # let the poison through decode, to reach the trainer
    tiny_settings.evaluation.holdout_fraction = 0.0
    tiny_settings.source.uri = f"file:{write_jsonl(tmp_path / 's.jsonl', rows)}"
    tiny_settings.source.exit_at_end = True
    metrics = CollectorRegistry()
    loop = TrainingLoop(tiny_settings, metrics)
    thread = threading.Thread(target=loop.run)
    thread.start()
    thread.join(timeout=180)
    assert not thread.is_alive()
    skipped = metrics.get_sample_value("dynft_train_steps_skipped_total", {"reason": "non_finite_loss"})
    assert skipped == 1  # its own step only; replayed, it would have skipped later ones too
    assert loop.trainer.steps > 30
    buffered, _ = loop.buffer.snapshot()
    assert len(buffered) > 200 and "poison" not in {r["event"]["id"] for r in buffered}
    assert Ledger(tiny_settings.state_dir / "ledger.db").lookup(["poison"])["poison"] == ("skipped", 1)


def test_a_producer_that_reuses_one_id_still_fills_the_held_out_window(tmp_path: Path) -> None:
    """The hold-out hash covers the text: with one id for every event, a tenth is still held out
    (by the id alone it was all or nothing), and a redelivered event goes the same way."""
    router = make_router(tmp_path, holdout=0.1)
    raws = [raw("same", text=f"w{i % 60} alpha{i % 4} w{i // 60}") for i in range(1000)]
    routed = router.route(records(raws))
    assert 50 < len(routed.held_out) < 150 and len(routed.fresh) + len(routed.held_out) == 1000
    again = router.route(records([r.raw for r, _ in routed.held_out[:20]]))
    assert len(again.held_out) == 20


def test_a_sharded_trainer_dead_letters_a_tasks_event_found_off_its_keys_partition(tmp_path: Path) -> None:
    settings = Settings()
    settings.evaluation.holdout_fraction = 0.0
    sink = JsonlDeadLetterSink(tmp_path / "dead.jsonl", "events")
    partition_of = {"intents": 1, "default": 0}.__getitem__  # as dynft.term.task_partition would say
    router = Router(settings, LabelMap(), sink, TrainerMetrics(CollectorRegistry()), partition_of=partition_of)
    on = lambda event_id, task, partition: Record(  # noqa: E731
        json.dumps({"id": event_id, "text": "w1", "label": "a", **({"task": task} if task else {})}).encode(),
        f"events/{partition}",
        1,
    )
    routed = router.route([on("a", "intents", 1), on("b", "intents", 0), on("c", None, 0), on("d", None, 1)])
    assert [e.id for _, e in routed.fresh] == ["a", "c"]
    assert [key for _, key in routed.dead] == ["b", "d"]
    letters = read_dead_letters(tmp_path / "dead.jsonl")
    assert {e["reason"] for e in letters} == {"wrong_partition"}
    assert "partition 1 of events" in letters[0]["detail"] and "key" in letters[0]["detail"]
