"""Word counts beside the adapter (dynft.lexical): the naive Bayes itself against river's, the
blend's weight, the state's round trips through versions and checkpoints, and its resets."""

from __future__ import annotations

import math

import pytest
import torch

from dynft.errors import VersionUnloadableError
from dynft.events import Event
from dynft.lexical import WEIGHTS, Lexicon, WordScorer, blend
from dynft.registry import LEXICAL, AdapterRegistry
from dynft.settings import Settings
from dynft.trainer import OnlineTrainer

TEXTS = [
    ("the plot was dull and slow", "neg"),
    ("a wonderful and moving film", "pos"),
    ("dull acting and a dull script", "neg"),
    ("moving music and wonderful acting", "pos"),
    ("slow but wonderful", "pos"),
]


def test_the_counts_answer_as_rivers_multinomial_naive_bayes() -> None:
    """Predict, then learn, event by event: the same probabilities as river's BagOfWords + MultinomialNB
    (buckets enough for no two of these words to share one)."""
    from river import feature_extraction, naive_bayes

    river = feature_extraction.BagOfWords() | naive_bayes.MultinomialNB()
    lexicon = Lexicon(buckets=1 << 20)
    labels = ["neg", "pos"]
    probes = ["dull film", "wonderful music", "nothing known here"]
    for text, label in TEXTS:
        lexicon.learn([text], [labels.index(label)], labels=2)
        river.learn_one(text, label)
        ours = lexicon.probabilities(probes, 2)
        for probe, row in zip(probes, ours, strict=True):
            theirs = river.predict_proba_one(probe)
            assert row.tolist() == pytest.approx([theirs.get(k, 0.0) for k in labels], abs=1e-5), probe


def test_a_label_without_events_gets_nothing_and_nothing_known_gives_a_row_of_zeros() -> None:
    lexicon = Lexicon(buckets=1024)
    assert lexicon.probabilities(["dull"], 2).tolist() == [[0.0, 0.0]]
    lexicon.learn(["dull"], [1], labels=3)
    assert lexicon.probabilities(["dull", "other"], 3).tolist() == [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]


def test_the_blend_follows_whichever_predicted_the_recent_events_better() -> None:
    truth = [0, 1] * 20
    right = torch.tensor([[0.9, 0.1] if y == 0 else [0.1, 0.9] for y in truth])
    unsure = torch.full((len(truth), 2), 0.5)
    lexicon = Lexicon(buckets=1024)
    assert lexicon.weight == 1.0  # no evidence: the adapter alone
    lexicon.weigh(unsure, right, truth)  # the counts were right, the adapter unsure
    assert lexicon.weight < 0.5
    for _ in range(20):
        lexicon.weigh(right, unsure, truth)  # and now the other way round
    assert lexicon.weight == 1.0
    before = lexicon.losses.clone()
    lexicon.weigh(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), [0])  # the counts knew no label
    lexicon.weigh(torch.tensor([[float("nan"), 0.0]]), right[:1], [0])  # the adapter knew no label yet
    assert torch.equal(lexicon.losses, before)


def test_blend_mixes_probabilities_and_keeps_the_adapters_where_the_counts_know_nothing() -> None:
    adapter = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    counts = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    assert torch.allclose(blend(adapter, counts, 0.3), torch.tensor([[0.24, 0.76], [0.6, 0.4]]))
    assert blend(adapter, counts, 1.0) is adapter


def test_the_state_round_trips_and_a_malformed_one_is_refused() -> None:
    lexicon = Lexicon(buckets=4096)
    lexicon.learn([t for t, _ in TEXTS], [int(y == "pos") for _, y in TEXTS], labels=2)
    lexicon.weigh(torch.tensor([[0.5, 0.5]]), torch.tensor([[0.1, 0.9]]), [1])
    state = lexicon.state(2)
    assert state["lexical.index"].shape[0] == int((lexicon.counts > 0).sum())  # sparse: only the words seen
    again = Lexicon.from_state(state, 2)
    assert torch.equal(again.counts, lexicon.counts) and again.weight == lexicon.weight
    assert torch.equal(WordScorer(again, 2).probabilities(["dull film"]), lexicon.probabilities(["dull film"], 2))
    dense = Lexicon(buckets=1024)
    dense.learn([" ".join(f"w{i}" for i in range(2000))], [0], labels=1)  # most buckets filled: stored dense
    assert "lexical.counts" in dense.state(1) and "lexical.index" not in dense.state(1)
    assert torch.equal(Lexicon.from_state(dense.state(1), 1).counts, dense.counts)
    broken = [
        {k: v for k, v in state.items() if k != "lexical.docs"},
        state | {"lexical.buckets": torch.tensor([1 << 40])},
        state | {"lexical.index": state["lexical.index"] + torch.tensor([0, 4096])},
        state | {"lexical.count": state["lexical.count"] * float("nan")},
        state | {"lexical.losses": torch.zeros(3)},
        state | {"lexical.docs": -state["lexical.docs"]},
        state | {"lexical.docs": torch.ones(100_000)},  # more labels than the version has: not allocated
        state | {"lexical.count": state["lexical.count"] * 3e38},  # finite counts whose sums are not
        state  # one bucket of a label twice: its totals would not be its counts'
        | {k: torch.cat([state[k], state[k][:1]]) for k in ("lexical.index", "lexical.count")},
        state | {"lexical.buckets": torch.tensor([float("inf")])},  # once an OverflowError
        state | {"lexical.index": state["lexical.index"].float() + 0.5},  # once truncated and accepted
        state | {"lexical.docs": torch.tensor(3.0)},  # a 0-d tensor
    ]
    for tensors in broken:
        with pytest.raises(ValueError, match="lexical counts"):
            Lexicon.from_state(tensors, 2)
        with pytest.raises(ValueError, match="lexical counts"):
            WordScorer.read(tensors, 2)


@pytest.mark.parametrize("words_per_text", [3, 400])  # few words: stored sparse; most buckets: stored dense
def test_a_read_state_scores_as_the_lexicon_it_was_taken_from(words_per_text: int) -> None:
    gen = torch.Generator().manual_seed(words_per_text)
    lexicon = Lexicon(buckets=512)
    words = torch.randint(0, 3000, (60, words_per_text), generator=gen).tolist()
    texts = [" ".join(f"w{w}" for w in row) for row in words]
    lexicon.learn(texts, [int(y) for y in torch.randint(0, 4, (60,), generator=gen)], labels=4)
    lexicon.weigh(torch.tensor([[0.7, 0.1, 0.1, 0.1]]), torch.tensor([[0.1, 0.7, 0.1, 0.1]]), [1])
    state = lexicon.state(4)
    assert ("lexical.index" in state) == (words_per_text == 3)
    probes = [*texts[:5], "w1 w2 w2999 unknown words", "", "w7"]
    read = WordScorer.read(state, 6)  # two labels the counts have not seen: empty rows, no probability
    expected = WordScorer(Lexicon.from_state(state, 6), 6)
    assert torch.allclose(read.probabilities(probes), expected.probabilities(probes), atol=1e-6)
    assert read.probabilities(probes)[:, 4:].abs().sum() == 0 and read.weight == lexicon.weight


def test_sparse_entries_in_any_order_read_alike_and_stored_zeros_are_no_words() -> None:
    """``state`` writes entries by bucket, so a load needs no sort; entries in another order (a
    version written before, label by label) or with a stored zero count read the same."""
    gen = torch.Generator().manual_seed(3)
    lexicon = Lexicon(buckets=512)
    texts = [" ".join(f"w{w}" for w in row) for row in torch.randint(0, 900, (40, 3), generator=gen).tolist()]
    lexicon.learn(texts, [i % 3 for i in range(40)], labels=3)
    state = lexicon.state(3)
    index, count = state["lexical.index"], state["lexical.count"]
    keys = index[:, 1].long() * 3 + index[:, 0].long()
    assert bool((keys[1:] > keys[:-1]).all())  # by bucket, then label
    by_label = torch.argsort(index[:, 0].long() * 512 + index[:, 1].long())
    shuffled = torch.randperm(len(count), generator=gen)
    empty = min(set(range(512)) - set(index[:, 1].tolist()))
    extra = torch.tensor([[2, empty]], dtype=index.dtype)  # a bucket no text hashed to, stored with 0
    zero_entry = {"lexical.index": torch.cat([index, extra]), "lexical.count": torch.cat([count, torch.zeros(1)])}
    with_zero = state | zero_entry
    probes = [*texts[:4], "w1 w2 unknown", ""]
    expected = WordScorer.read(state, 3)
    for order in (by_label, shuffled):
        read = WordScorer.read(state | {"lexical.index": index[order], "lexical.count": count[order]}, 3)
        assert torch.equal(read.probabilities(probes), expected.probabilities(probes))
        assert torch.equal(read.denominator, expected.denominator)
    zero = WordScorer.read(with_zero, 3)
    assert torch.equal(zero.denominator, expected.denominator)  # the vocabulary counts buckets with words only
    assert torch.equal(zero.probabilities(probes), expected.probabilities(probes))
    assert int(Lexicon.from_state(with_zero, 3).seen.sum()) == int(lexicon.seen.sum())


def test_a_version_of_many_labels_is_read_without_its_dense_matrix() -> None:
    """20,000 labels over 2**20 buckets would be an 80 GB matrix: its few words are read as they are stored."""
    labels, buckets = 20_000, 1 << 20
    lexicon = Lexicon(buckets=buckets)
    lexicon.learn(["alpha beta", "gamma"], [0, 1], labels=2)
    small = lexicon.state(2)
    index = torch.cat([small["lexical.index"], torch.tensor([[labels - 1, 7]], dtype=torch.int32)])
    state = small | {
        "lexical.index": index,
        "lexical.count": torch.cat([small["lexical.count"], torch.tensor([5.0])]),
        "lexical.docs": torch.cat([small["lexical.docs"], torch.zeros(labels - 3), torch.tensor([1.0])]),
    }
    probabilities = WordScorer.read(state, labels).probabilities(["alpha beta", "gamma"])
    assert probabilities.shape == (2, labels) and probabilities.argmax(1).tolist() == [0, 1]


def events(n: int) -> list[Event]:
    return [Event(id=f"e{i}", text=TEXTS[i % len(TEXTS)][0], label=TEXTS[i % len(TEXTS)][1]) for i in range(n)]


def test_the_trainer_counts_fresh_events_and_versions_and_checkpoints_carry_the_counts(
    tiny_trainer: OnlineTrainer, tiny_settings: Settings
) -> None:
    fresh = events(10)
    tiny_trainer.step(tiny_trainer.collator(fresh[:5], n_fresh=5))
    tiny_trainer.step(tiny_trainer.collator(fresh[5:] + fresh[:3], n_fresh=5))  # three replayed: not counted
    lexicon = tiny_trainer.lexicon
    assert lexicon is not None and lexicon.docs.tolist() == [4.0, 6.0]  # labels in order of arrival: neg, pos
    assert float(lexicon.losses.sum()) > 0  # the second step's events were predicted by both first
    registry = AdapterRegistry(tiny_settings.registry_dir)
    info = registry.publish(tiny_trainer.export(), {})
    state, _ = registry.load(info.version)
    assert state.lexical is not None and torch.equal(Lexicon.from_state(state.lexical, 2).counts, lexicon.counts)
    tensors, saved = tiny_trainer.snapshot()
    tiny_trainer.step(tiny_trainer.collator(fresh[:5], n_fresh=5))
    tiny_trainer.restore(tensors, saved)
    assert tiny_trainer.lexicon is not None and tiny_trainer.lexicon.docs.tolist() == [4.0, 6.0]
    tiny_trainer.reset_adapter()  # a new lineage: the words may mean other labels now
    assert tiny_trainer.lexicon.docs.sum() == 0
    tiny_trainer.load(state)  # continuing from a version takes its counts
    assert tiny_trainer.lexicon.docs.tolist() == [4.0, 6.0]


def test_a_version_whose_counts_were_changed_on_disk_is_refused(
    tiny_trainer: OnlineTrainer, tiny_settings: Settings
) -> None:
    tiny_trainer.step(tiny_trainer.collator(events(5), n_fresh=5))
    registry = AdapterRegistry(tiny_settings.registry_dir)
    info = registry.publish(tiny_trainer.export(), {})
    data = bytearray((info.path / LEXICAL).read_bytes())
    data[-1] ^= 1
    (info.path / LEXICAL).write_bytes(bytes(data))
    with pytest.raises(VersionUnloadableError, match="content hash"):
        registry.load(info.version)


def test_the_counts_are_off_with_the_setting(tiny_settings: Settings) -> None:
    from dynft.trainer import build_trainer

    tiny_settings.trainer.lexical_blend = False
    trainer = build_trainer(tiny_settings.model, tiny_settings.adapter, tiny_settings.trainer)
    trainer.step(trainer.collator(events(5), n_fresh=5))
    assert trainer.lexicon is None and trainer.export().lexical is None
    assert math.isclose(float(WEIGHTS[0]), 1.0)  # ties go to the adapter alone


def test_the_gate_predicts_what_the_server_answers_the_blend(tiny_trainer: OnlineTrainer) -> None:
    """The trainer's predictions (the gate's) mix the word counts in as the server does, for the
    live weights and for a version swapped in."""
    tiny_trainer.step(tiny_trainer.collator(events(10), n_fresh=10))
    probe = [Event(id=f"p{i}", text=text, label="neg") for i, (text, _) in enumerate(TEXTS)]
    lexicon = tiny_trainer.lexicon
    assert lexicon is not None
    lexicon.losses = WEIGHTS.clone()  # lowest at a share of 0: the counts alone
    labels = tiny_trainer.exported_labels()
    alone = [labels[int(i)] for i in lexicon.probabilities([e.text for e in probe], len(labels)).argmax(-1)]
    assert tiny_trainer.predictions(probe) == alone
    state = tiny_trainer.export()
    lexicon.losses = WEIGHTS.flip(0).clone()  # the live blend moves to the adapter alone; the version keeps its
    assert tiny_trainer.predictions(probe, state) == alone
    assert tiny_trainer.predictions(probe) == tiny_trainer.predict(probe, labels)


def test_teacher_only_events_are_counted_by_the_teachers_shares_and_step_predictions_are_the_blends(
    tiny_trainer: OnlineTrainer,
) -> None:
    """An event labelled by its teacher alone counts its words under each label by the teacher's
    share of it (0.9 of "dull dull film" to neg, 0.1 to pos), where a labelled event counts them
    whole; the step's predictions are the blend's."""
    from dynft.events import decode
    from dynft.lexical import bag
    from dynft.settings import EventSettings

    tiny_trainer.step(tiny_trainer.collator(events(10), n_fresh=10))
    taught = decode(b'{"id": "t", "text": "dull dull film", "teacher": {"neg": 0.9, "pos": 0.1}}', EventSettings())
    assert isinstance(taught, Event) and taught.label_from_teacher
    lexicon = tiny_trainer.lexicon
    assert lexicon is not None
    neg, pos = tiny_trainer.label_map.get("neg"), tiny_trainer.label_map.get("pos")
    assert neg is not None and pos is not None
    docs, counts, totals = lexicon.docs.clone(), lexicon.counts.clone(), lexicon.totals.clone()
    lexicon.losses = WEIGHTS.clone()  # the counts alone answer
    probe = events(5)
    result = tiny_trainer.step(tiny_trainer.collator([taught, *probe], n_fresh=6))
    assert result.predictions[1:] == [label for _, label in TEXTS]  # the counts know these texts

    def probes(word: int, label: str) -> int:  # the probes' own count of a word under their label
        return sum(bag(e.text, lexicon.buckets)[word] for e in probe if e.label == label)

    for word, times in (("dull", 2), ("film", 1)):  # in "dull dull film"
        k = next(iter(bag(word, lexicon.buckets)))
        for label, index, share in (("neg", neg, 0.9), ("pos", pos, 0.1)):
            expected = counts[index, k].item() + probes(k, label) + share * times
            assert lexicon.counts[index, k].item() == pytest.approx(expected), (word, label)
    assert lexicon.docs[neg].item() == pytest.approx(docs[neg].item() + 2 + 0.9)
    assert lexicon.docs[pos].item() == pytest.approx(docs[pos].item() + 3 + 0.1)
    words = sum(sum(bag(e.text, lexicon.buckets).values()) for e in probe) + 3
    assert (lexicon.totals - totals).sum().item() == pytest.approx(words)


def test_a_labelled_event_with_a_teacher_is_counted_as_its_loss_mixes_them(tiny_trainer: OnlineTrainer) -> None:
    """Label "pos" and a teacher of neg 0.9 / pos 0.1, with ``trainer.distill_alpha`` 0.5: the
    words count 0.45 under neg and 0.55 under pos, the targets the adapter's loss mixes."""
    from dynft.events import decode
    from dynft.lexical import bag
    from dynft.settings import EventSettings

    tiny_trainer.step(tiny_trainer.collator(events(10), n_fresh=10))
    record = b'{"id": "t", "text": "dull dull film", "label": "pos", "teacher": {"neg": 0.9, "pos": 0.1}}'
    taught = decode(record, EventSettings())
    assert isinstance(taught, Event) and not taught.label_from_teacher
    assert tiny_trainer.settings.distill_alpha == 0.5
    lexicon = tiny_trainer.lexicon
    neg, pos = tiny_trainer.label_map.get("neg"), tiny_trainer.label_map.get("pos")
    assert lexicon is not None and neg is not None and pos is not None
    counts, docs = lexicon.counts.clone(), lexicon.docs.clone()
    tiny_trainer.step(tiny_trainer.collator([taught], n_fresh=1))
    k = next(iter(bag("dull", lexicon.buckets)))
    assert lexicon.counts[neg, k].item() == pytest.approx(counts[neg, k].item() + 2 * 0.45)
    assert lexicon.counts[pos, k].item() == pytest.approx(counts[pos, k].item() + 2 * 0.55)
    assert lexicon.docs[pos].item() == pytest.approx(docs[pos].item() + 0.55)


def test_a_one_hot_teacher_counts_as_its_label() -> None:
    """Soft counting generalises the hard one: a teacher sure of one label counts exactly as that label."""
    texts = ["a great film", "an awful film", "great acting, great cast"]
    hard, soft = Lexicon(buckets=256), Lexicon(buckets=256)
    adapter = torch.full((3, 2), 0.5)
    hard.observe(texts, [0, 1, 0], 2, adapter)
    shares = {0: torch.tensor([1.0, 0.0]), 1: torch.tensor([0.0, 1.0]), 2: torch.tensor([1.0, 0.0])}
    soft.observe(texts, [0, 1, 0], 2, adapter, shares)
    for name in ("counts", "totals", "docs", "seen", "losses"):
        assert torch.equal(getattr(hard, name), getattr(soft, name)), name
    assert hard.probabilities(["great"], 2).tolist() == soft.probabilities(["great"], 2).tolist()


def test_new_labels_grow_the_counts_in_place_with_spare_rows() -> None:
    """A stream of new labels copies the count matrix a few times, not once per label, and counts stay exact."""
    lexicon = Lexicon(buckets=1024)
    copies, matrix = 0, None
    for label in range(200):
        lexicon.learn([f"word{label} shared"], [label], labels=label + 1)
        if lexicon.counts.data_ptr() != matrix:
            copies, matrix = copies + 1, lexicon.counts.data_ptr()
    assert copies <= 15  # growth by half: 1, 2, 3, 4, 6, 9, ... 200
    assert lexicon.counts.shape == (200, 1024) and lexicon.docs.tolist() == [1.0] * 200
    assert torch.equal(lexicon.counts.sum(1), lexicon.totals) and lexicon.totals.tolist() == [2.0] * 200
    again = Lexicon.from_state(lexicon.state(200), 200)
    again.learn(["word7 again"], [200], labels=201)  # a restored lexicon grows from its own rows
    assert torch.equal(again.counts[:200], lexicon.counts) and again.counts[200].sum() == 2


def test_shared_counts_travel_in_a_version_and_score_as_the_live_lexicon() -> None:
    """Counts split by a teacher are fractions: a version's state carries them and its reader scores as the lexicon."""
    lexicon = Lexicon(buckets=256)
    lexicon.observe(["dull dull film", "great film"], [0, 1], 2, torch.full((2, 2), 0.5), {0: torch.tensor([0.7, 0.3])})
    assert lexicon.docs.tolist() == pytest.approx([0.7, 1.3])
    read = WordScorer.read(lexicon.state(2), 2)
    texts = ["dull film", "great", "film"]
    assert torch.allclose(read.probabilities(texts), lexicon.probabilities(texts, 2))
