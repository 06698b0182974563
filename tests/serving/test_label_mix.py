"""The label mix: recent label rates that the trainer hands to the fast path, as its rows' prior."""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import pytest
import torch

from dynft.events import Event
from dynft.serving.labelmix import MIX_FILE, LabelMix, LabelRates, read_rates, uneven
from dynft.serving.prototypes import SHOTS_FILE, FastPath, ShotLog

SHOTS = 8
WIDTH = 16


def events(labels: list[str]) -> list[Event]:
    return [Event(id=str(i), text=f"text {i}", label=label) for i, label in enumerate(labels)]


def embed(texts: list[str]) -> torch.Tensor:
    """A fixed random feature per text (what a version would embed)."""
    rows = []
    for text in texts:
        generator = torch.Generator().manual_seed(sum(map(ord, text)) * 7919 + len(text))
        rows.append(torch.randn(WIDTH, generator=generator))
    return torch.stack(rows)


def fast_path_after(path: Path, labels: list[str], lineage: int = 1) -> FastPath:
    ShotLog(path, SHOTS).offer(events(labels), lineage=lineage)
    fast = FastPath(path, SHOTS)
    fast.poll()
    fast.take()
    return fast


def test_rates_follow_the_recent_mix_and_a_new_label_is_judged_on_its_own_lifetime() -> None:
    mix = LabelMix(Path("unused"))
    for label in ["common"] * 4 + ["rare"]:
        mix.add(label)
    assert mix.rates() == {}  # five events cannot tell an uneven mix from chance
    for label in (["common"] * 9 + ["rare"]) * 30:
        mix.add(label)
    steady = mix.rates()
    assert steady["common"] == pytest.approx((90 + 5) / (100 + 10))
    assert steady["rare"] == pytest.approx((10 + 5) / (100 + 10))
    for _ in range(30):  # class-incremental: a new label is what arrives now, the old ones stop
        mix.add("new")
    now = mix.rates()
    assert now["new"] == pytest.approx((30 + 5) / (30 + 10))  # over its 30 events, not the window's 100
    assert now["new"] > now["common"] > now["rare"]


def test_no_rates_while_the_window_is_as_even_as_equal_shares_leave_it_by_chance() -> None:
    rng = random.Random(0)
    mix = LabelMix(Path("unused"))
    for _ in range(300):  # eleven equally common intents, as a class-incremental phase
        mix.add(rng.choice("abcdefghijk"))
    assert mix.rates() == {}  # their counts differ, by chance only: no prior
    assert uneven([60, 20, 20]) and uneven([87, 13]) and not uneven([12, 9, 8, 11, 10]) and not uneven([5])
    for _ in range(100):
        mix.add("a" if rng.random() < 0.6 else rng.choice("bc"))
    rates = mix.rates()
    assert max(rates, key=rates.__getitem__) == "a"


def test_the_mix_file_is_replaced_at_most_once_a_second_and_read_back(tmp_path: Path) -> None:
    clock = [0.0]
    mix = LabelMix(tmp_path / "label-mix.json", clock=lambda: clock[0])
    mix.write()
    assert not mix.path.exists()  # nothing counted: nothing to say
    for label in ["a"] * 30:
        mix.add(label)
    mix.write()
    assert read_rates(mix.path) == LabelRates(1, {})  # one label: nothing to weigh
    for label in ["b"] * 5:
        mix.add(label)
    clock[0] = 0.5
    mix.write()
    assert read_rates(mix.path) == LabelRates(1, {})  # too soon to write again
    clock[0] = 1.0
    mix.write()
    assert read_rates(mix.path) == LabelRates(1, {"a": pytest.approx(35 / 45), "b": pytest.approx(10 / 30)})
    assert not list(tmp_path.glob("*.tmp"))
    mix.reset(2)  # a drift reaction reset the head: counted afresh, under the new lineage
    mix.add("c")
    clock[0] = 2.0
    mix.write()
    assert read_rates(mix.path) == LabelRates(2, {})


def test_a_mix_the_disk_refuses_is_said_once_and_written_again_once_it_can_be(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [0.0]
    missing = tmp_path / "gone"  # a directory that is not there: every write fails
    mix = LabelMix(missing / "label-mix.json", clock=lambda: clock[0])
    with caplog.at_level(logging.INFO):
        for second in range(5):
            clock[0] = float(second)
            mix.add("a")
            mix.write()
        assert caplog.text.count("cannot hand the label mix") == 1
        missing.mkdir()
        clock[0] = 9.0
        mix.write()  # no event since the last failure: tried again all the same (ShotLog.idle on a quiet stream)
    assert read_rates(mix.path) == LabelRates(1, {})  # five events of one label: nothing to weigh
    assert "reaches the server's fast path again" in caplog.text


@pytest.mark.parametrize(
    "body",
    [
        "{not json",
        "[1, 2]",
        '{"lineage": 1}',
        '{"lineage": "1", "rates": {"a": 0.5}}',
        '{"lineage": true, "rates": {"a": 0.5}}',
        '{"lineage": 1, "rates": {"a": 0}}',
        '{"lineage": 1, "rates": {"a": 1.5}}',
        '{"lineage": 1, "rates": {"a": "0.5"}}',
        '{"lineage": 1, "rates": {"a": NaN}}',
        '{"lineage": 1, "rates": []}',
    ],
)
def test_a_malformed_mix_file_is_ignored_with_a_warning(
    tmp_path: Path, body: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "label-mix.json"
    path.write_text(body)
    with caplog.at_level(logging.WARNING):
        assert read_rates(path) is None
    assert "label mix" in caplog.text
    assert read_rates(tmp_path / "missing.json") is None


def test_a_prototype_row_adds_its_labels_recent_rate_so_an_unclear_text_gets_the_commoner_label(
    tmp_path: Path,
) -> None:
    path = tmp_path / SHOTS_FILE
    fast = fast_path_after(path, (["common"] * 4 + ["rare"]) * 20)
    assert (path.parent / MIX_FILE.name).exists()  # the trainer's side wrote the mix beside the shots
    assert fast.rates is not None and fast.rates.rates["common"] > fast.rates.rates["rare"]
    queries = torch.randn(200, WIDTH, generator=torch.Generator().manual_seed(3))
    head = torch.nn.Linear(WIDTH, 1)  # known = []: as version 0, prototype rows alone
    version = object()  # one version for both: its shot features are embedded once
    labels, with_prior = fast.extend(version, [], head, queries, embed)
    assert labels == ["common", "rare"] and with_prior is not None
    rates, fast.rates = fast.rates, None
    _, without = fast.extend(version, [], head, queries, embed)
    assert without is not None
    # The prior is exactly each label's log rate less the mean log rate, added to its row.
    logs = [math.log(rates.rates[label]) for label in labels]
    expected = torch.tensor([x - sum(logs) / 2 for x in logs])
    assert torch.allclose(with_prior - without, expected.expand_as(without), atol=1e-5)
    common_with = (with_prior.argmax(1) == 0).float().mean()
    common_without = (without.argmax(1) == 0).float().mean()
    assert common_with > common_without + 0.2, (common_with, common_without)


def test_the_prior_measures_a_pending_row_against_every_label_answered_with(tmp_path: Path) -> None:
    fast = fast_path_after(tmp_path / SHOTS_FILE, ["known"] * 60 + ["new"] * 10)
    rates = fast.rates
    assert rates is not None
    # "new" is pending beside the version's own row of "known": measured against both.
    assert fast.prior(["new"], ["known"]) == [
        pytest.approx((math.log(rates.rates["new"]) - math.log(rates.rates["known"])) / 2)
    ]
    assert rates.prior(["unseen"], ["known", "unseen"]) == [0.0]  # no rate: no prior
    assert rates.prior(["new"], []) == [0.0]


def test_a_mix_of_another_lineage_than_the_shots_adds_no_prior(tmp_path: Path) -> None:
    path = tmp_path / SHOTS_FILE
    fast = fast_path_after(path, (["a"] * 9 + ["b"]) * 10, lineage=3)
    assert fast.rates is not None and fast.rates.lineage == 3
    assert fast.prior(["a", "b"], []) is not None
    (path.parent / MIX_FILE.name).write_text(json.dumps({"lineage": 2, "rates": {"a": 0.9, "b": 0.1}}))
    fast.poll()
    fast.take()
    assert fast.prior(["a", "b"], []) is None  # the old concept's mix says nothing now


def test_a_mix_file_that_is_gone_or_spoilt_takes_its_prior_along(tmp_path: Path) -> None:
    path = tmp_path / SHOTS_FILE
    fast = fast_path_after(path, (["a"] * 9 + ["b"]) * 10)
    assert fast.prior(["a", "b"], []) is not None
    mix = path.parent / MIX_FILE.name
    mix.write_text("{cut")
    fast.poll()
    fast.take()
    assert fast.prior(["a", "b"], []) is None
    fast = fast_path_after(tmp_path / "other" / SHOTS_FILE.name, (["a"] * 9 + ["b"]) * 10)
    assert fast.prior(["a", "b"], []) is not None
    (tmp_path / "other" / MIX_FILE.name).unlink()  # a state directory wiped under a running server
    fast.poll()
    fast.take()
    assert fast.prior(["a", "b"], []) is None


def test_a_state_reset_rereads_the_mix_of_the_new_trainer(tmp_path: Path) -> None:
    path = tmp_path / SHOTS_FILE
    fast = fast_path_after(path, (["a"] * 9 + ["b"]) * 10)
    path.write_text("")  # a new trainer started on a fresh state directory
    mix = path.parent / MIX_FILE.name
    mix.unlink()
    ShotLog(path, SHOTS).offer(events((["c"] * 9 + ["d"]) * 10))
    fast.poll()
    fast.take()
    rates = fast.rates
    assert rates is not None and set(rates.rates) == {"c", "d"}
    assert fast.prior(["c", "d"], []) is not None
