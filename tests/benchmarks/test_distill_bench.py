"""The distillation benchmark end to end on a tiny model and a short stream (no figures asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.quality import distill
from benchmarks.quality.teacher import FILE, compact, distributions


def test_the_three_configurations_train_on_what_they_are_given(tiny_model_dir: Path) -> None:
    teachers, accuracy, classes = distill.teacher("trec6", str(tiny_model_dir))
    assert len(teachers) == len(distill.load("trec6", "train")) and 0.0 <= accuracy <= 1.0
    assert all(abs(sum(t.values()) - 1.0) < 1e-3 and set(t) == set(classes) for t in teachers[:20])
    labels_only = distill.stream("trec6", teachers, "labels only", 40, seed=1)
    with_teacher = distill.stream("trec6", teachers, "labels + teacher", 40, seed=1)
    tenth = distill.stream("trec6", teachers, "teacher + 10% labels", 40, seed=1)
    assert [e.text for e in labels_only] == [e.text for e in with_teacher] == [e.text for e in tenth]
    assert all(e.teacher is None for e in labels_only) and all(e.teacher for e in with_teacher)
    assert sum(not e.label_from_teacher for e in tenth) == 4  # a tenth keeps its own label
    assert all(e.label == max(e.teacher, key=e.teacher.get) for e in tenth if e.label_from_teacher and e.teacher)

    result = distill.run("trec6", 32, 1, 1, str(tiny_model_dir))
    assert set(result["summary"]) == set(distill.CONFIGS)
    assert all(0.0 <= row["test_mean"] <= 1.0 for row in result["summary"].values())
    assert "| labels + teacher |" in distill.markdown(result, "cmd", (1.0, 1.0, 1.0))


def test_steps_are_composed_as_the_daemons_fresh_rows_then_replayed_ones_with_their_teachers(
    tiny_model_dir: Path,
) -> None:
    """With replay every step after the first holds ``batch_size`` rows, the fresh ones first (the
    daemon's share), the rest drawn from the events trained before, teachers kept; without it,
    every row is fresh."""
    from dynft.settings import load_settings
    from dynft.trainer import build_trainer

    teachers, _, _ = distill.teacher("trec6", str(tiny_model_dir))
    events = distill.stream("trec6", teachers, "labels + teacher", 40, seed=2)
    truths = [e.label for e in events]
    for replay in (True, False):
        settings = load_settings(overrides={"model.path": str(tiny_model_dir), "trainer.seed": 2})
        trainer = build_trainer(settings.model, settings.adapter, settings.trainer)
        steps: list[tuple[int, int, bool]] = []
        step = trainer.step

        def recording(batch, step=step, steps=steps):  # type: ignore[no-untyped-def]
            steps.append((len(batch.events), batch.n_fresh, all(e.teacher for e in batch.events)))
            return step(batch)

        trainer.step = recording  # a real step, recorded on the way in
        correct = distill.train(trainer, settings, events, truths, seed=2, replay=replay)
        assert 0 <= correct <= len(events)
        fresh = [n for _, n, _ in steps]
        assert sum(fresh) == len(events) and all(has_teacher for *_, has_teacher in steps)
        if replay:
            share = round(settings.trainer.batch_size * (1 - settings.buffer.replay_ratio))
            assert fresh == [share] * (len(events) // share)
            assert steps[0][0] == share and all(rows == settings.trainer.batch_size for rows, *_ in steps[1:])
        else:
            assert fresh == [16, 16, 8] and all(rows == n for rows, n, _ in steps)


@pytest.mark.parametrize("dataset", ["ag_news", "banking77"])
def test_the_shipped_fine_tuned_teacher_is_a_distribution_per_text_and_scores_as_it_says(dataset: str) -> None:
    """``data/<dataset>/teacher-mpnet-ft.json`` (``benchmarks.quality.teacher``): a distribution
    over the split's classes for every training text, its stated accuracy recomputed from its own
    top labels on the test split, and its fine-tuning texts outside both splits by construction."""
    teachers, accuracy, classes = distill.teacher(dataset, None, "mpnet-ft")
    train, test = distill.load(dataset, "train"), distill.load(dataset, "test")
    prepared = json.loads((distill.DATA / dataset / FILE).read_text())
    assert len(teachers) == len(train) and len(prepared["test_predicted"]) == len(test)
    assert set(classes) == {r["label"] for r in train}
    assert all(abs(sum(t.values()) - 1.0) < 1e-9 and set(t) == set(classes) for t in teachers)
    right = sum(classes[k] == r["label"] for k, r in zip(prepared["test_predicted"], test, strict=True))
    assert right / len(test) == accuracy > 0.8  # a stronger model than the student
    agree = sum(max(t, key=t.get) == r["label"] for t, r in zip(teachers, train, strict=True)) / len(train)
    assert agree > 0.8  # its distributions are predictions of these texts' labels, in the file's order
    assert prepared["fine_tuned_on"] > len(train)  # more texts than the stream holds
    stream = distill.stream(dataset, teachers, "labels + teacher", 40, seed=0)
    assert all(e.teacher and abs(e.teacher[c] - teachers[int(e.id[1:])][c]) < 1e-4 for e in stream for c in classes)


def test_a_compact_teacher_keeps_each_probability_within_half_a_percent() -> None:
    """``compact`` rounds log-probabilities to 0.01; ``distributions`` gives back each probability
    within 0.5% of its own after renormalising, the order of the classes kept."""
    import numpy as np

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, size=(50, 77))
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    classes = [f"c{i}" for i in range(77)]
    got = distributions({"classes": classes, "train_log_probs": compact(log_probs)})
    for row, dist in zip(np.exp(log_probs), got, strict=True):
        assert list(dist) == classes and abs(sum(dist.values()) - 1.0) < 1e-12
        assert np.allclose([dist[c] for c in classes], row, rtol=0.011, atol=0)
