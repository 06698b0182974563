"""The served-accuracy protocol's scoring and daemon settings (the daemon itself is left out: slow)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is not an installed package
    sys.path.insert(0, str(ROOT))

from smoke_suite import smoke_suite  # noqa: E402

from benchmarks.quality import report  # noqa: E402
from benchmarks.quality.__main__ import add_served  # noqa: E402
from benchmarks.quality.harness import run_suite  # noqa: E402
from benchmarks.quality.served import daemon_env, markdown, on_positions, rolling, score  # noqa: E402
from benchmarks.quality.streams import Phase, Sizes, Stream  # noqa: E402
from benchmarks.quality.suites import QUICK  # noqa: E402
from dynft.settings import load_settings  # noqa: E402


def test_the_score_is_what_the_server_answered_and_a_refusal_counts_as_wrong() -> None:
    events = [(f"text {i}", "a" if i < 4 else "b") for i in range(8)]
    stream = Stream("s", "test", events, [Phase("one", 0, [])])
    served = {"answers": [None, None, "a", "b", "b", "b", None, "b"], "versions": [None, None, 1, 1, 2, 2, None, 3]}
    result = score(stream, QUICK, served | {"feed_behind_s": 0.0}, 8, compare=False)
    assert result["served_accuracy"] == 4 / 8  # events 2, 4, 5, 7
    assert result["served_by_quarter"] == [0.0, 0.5, 1.0, 0.5]
    assert (result["unanswered"], result["first_answered_at"], result["versions_seen"]) == (3, 2, 3)
    assert "| s | 8 | 0.500 |" in markdown(
        {"suite": "quick", "rate": 20.0, "machine": "m", "streams": {"s": result}}, "c"
    )


def test_the_daemon_follows_its_file_with_the_suites_settings_and_time_based_publishing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = daemon_env(QUICK, tmp_path / "state", tmp_path / "events.jsonl", 8123)
    for key, value in env.items():
        if key.startswith("DYNFT_"):
            monkeypatch.setenv(key, value)
    settings = load_settings()  # the daemon's own parsing of its environment
    assert env["DYNFT_SOURCE__FOLLOW"] == "true" and env["DYNFT_SOURCE__URI"] == f"file:{tmp_path / 'events.jsonl'}"
    assert env["DYNFT_REGISTRY__PUBLISH_EVERY_STEPS"] == str(QUICK.publish_every_steps)
    assert "DYNFT_REGISTRY__PUBLISH_INTERVAL_S" not in env  # the shipped seconds: freshness is measured in them
    # The shipped freshest-first switch (dynft.behind): what users running a live feed get.
    assert "DYNFT_TRAINER__FRESHEST_FIRST_BACKLOG" not in env and settings.trainer.freshest_first_backlog > 0
    assert settings.source.follow and settings.server.port == 8123 and settings.state_dir == tmp_path / "state"
    assert settings.registry.publish_interval_s == 20.0 and settings.model.max_length == QUICK.max_length


def test_set_values_that_are_lists_or_mappings_reach_the_daemon_as_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = {"drift.reactions": ["boost", "retire"], "drift.input_params": {"delta": 3.0, "threshold": 50.0}}
    env = daemon_env(QUICK, tmp_path / "state", tmp_path / "events.jsonl", 8123, extra)
    for key, value in env.items():
        if key.startswith("DYNFT_"):
            monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.drift.reactions == ["boost", "retire"]
    assert settings.drift.input_params == {"delta": 3.0, "threshold": 50.0}


def test_a_server_a_phase_behind_on_a_class_incremental_stream_scores_zero_for_want_of_the_labels() -> None:
    # What the quick suite's banking run showed (served 0.000 with 7 versions): every answer is a
    # label of the phase before, from versions that never held the phase's own labels. The score
    # is right to be zero, and says why: no answer came from a version that knew the label.
    events = [(f"t{i}", label) for i, label in enumerate(["a", "b", "a", "b", "c", "d", "c", "d", "e", "f", "e", "f"])]
    stream = Stream("s", "class-incremental", events, [Phase("1", 0, []), Phase("2", 4, []), Phase("3", 8, [])])
    answers = [None, None, None, None, "a", "b", "b", "a", "c", "d", "d", "c"]
    versions = [None] * 4 + [1] * 4 + [2] * 4
    knew = [False] * 12  # version 1 knows a and b, version 2 a to d
    served = {"answers": answers, "versions": versions, "knew": knew, "feed_behind_s": 0.0}
    result = score(stream, QUICK.with_overrides(window=4), served, 12, compare=False)
    assert result["served_accuracy"] == 0.0 and result["answered_knowing_label"] == 0.0
    assert result["served_accuracy_when_known"] is None
    assert (result["first_answered_at"], result["versions_seen"]) == (4, 2)

    # The same server, one event into each phase later: what it answers right is what it knew.
    answers = [None, "b", "a", "b", "a", "d", "c", "d", "c", "f", "e", "e"]  # the last one wrong though known
    knew = [False, True, True, True, False, True, True, True, False, True, True, True]
    served = {"answers": answers, "versions": [None, *[1] * 11], "knew": knew, "feed_behind_s": 0.0}
    result = score(stream, QUICK.with_overrides(window=4), served, 12, compare=False)
    assert (result["served_accuracy"], result["answered_knowing_label"]) == (round(8 / 12, 4), 0.75)
    assert abs(result["served_accuracy_when_known"] - 8 / 9) < 1e-4
    assert result["curve"][0] == (3, 0.75) and result["curve"][-1] == (11, 0.5) and len(result["curve"]) == 9
    assert on_positions([t for _, t in events], answers, [0, 1, 4]) == 1 / 3
    assert "| s | 12 | 0.667 |" in markdown({"suite": "q", "rate": 20.0, "machine": "m", "streams": {"s": result}}, "c")


def test_rolling_accuracy_counts_a_refusal_as_wrong() -> None:
    truths = ["a", "a", "b", "b", "b"]
    assert rolling(truths, [None, "a", "b", "a", "b"], window=2, every=1) == [(1, 0.5), (2, 1.0), (3, 0.5), (4, 0.5)]
    assert rolling(truths, ["a"] * 5, window=10, every=2) == [(4, 0.4)]


@pytest.mark.slow
def test_the_quality_benchmark_reports_what_a_real_daemon_served_beside_prequential_and_river(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    tiny = Sizes(24, 8, 60, 4, 1, 1, 48, 8)
    suite = smoke_suite(
        tiny_model_dir,
        tiny,
        streams=("domain",),
        paradigm_datasets=(),
        anchor_streams=(),
    )
    results = run_suite(suite, workers=1, progress=lambda line: None)
    add_served(results, suite, rate=12.0, logs=tmp_path / "logs")
    written = report.write(report.complete(results), tmp_path, "python -m benchmarks.quality --suite smoke")

    sv = results["streams"]["domain"]["served"]
    assert sv["events"] == 72 and sv["rate"] == 12.0
    assert sv["unanswered"] + round(sv["answered_knowing_label"] * 72) <= 72
    assert 0.0 <= sv["served_accuracy"] <= 1.0 and 0.0 <= sv["served on dynft's events"] <= 1.0
    assert len(sv["served_by_quarter"]) == 4 and sv["curve"][-1][0] == 71
    assert (tmp_path / "logs" / "served-smoke-domain.log").stat().st_size > 0  # the daemon ran and logged
    goals = {g["goal"] for g in results["goals"]}
    assert "served within 3 points of prequential" in goals
    assert {"served accuracy >= best river + 10 points", "served error <= half of best river's"} & goals
    text = (tmp_path / "quality-smoke.md").read_text()
    assert "## Served accuracy" in text and "| dynft, served |" in text
    assert tmp_path / "quality-smoke-domain.png" in written


def test_any_json_lines_file_becomes_a_stream_in_file_order_with_a_held_back_test_slice(tmp_path: Path) -> None:
    from benchmarks.quality.streams import from_jsonl

    path = tmp_path / "my-news.jsonl"
    path.write_text("".join(f'{{"text": "t{i}", "label": "{"ab"[i % 2]}", "extra": 1}}\n' for i in range(30)))
    stream = from_jsonl(path)
    assert stream.name == "my-news" and stream.drift_points == []
    assert stream.events == [(f"t{i}", "ab"[i % 2]) for i in range(27)]  # the last 10% are the test slice
    assert stream.phases[0].test == [(f"t{i}", "ab"[i % 2]) for i in range(27, 30)]
    assert stream.event_id(3) == "my-news-000003"
    path.write_text('{"text": "x", "label": "a"}\n["text", "label"]\n')
    with pytest.raises(ValueError, match=r"my-news\.jsonl, line 2: not an object with text and label"):
        from_jsonl(path)


def test_a_file_of_another_dataset_s_shape_streams_its_usable_rows_and_names_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found by a probe: a byte order mark, a blank text or a text over the daemon's limit ended the
    run with a traceback (json's, or the server's 422), and a null label became the label "None"."""
    from benchmarks.quality.streams import StreamFileError, from_jsonl

    rows = [
        b'\xef\xbb\xbf{"text": "a", "label": "x"}',
        b'{"text": " ", "label": "x"}',
        b"",
        b'{"text": "b", "label": null}',
    ]
    rows += [
        b'{"text": "c\xe2\x80\xa8c", "label": 3}',  # U+2028 inside a string: one line of JSON all the same
        b'{"text": "' + b"d" * 40 + b'", "label": "y"}',
        b'{"text": "e", "label": "y"}',
    ]
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\r\n".join(rows) + b"\r\n")
    stream = from_jsonl(path, test_share=0.0, name="emotion-train", max_text_chars=30)
    assert stream.name == "emotion-train" and stream.events == [("a", "x"), ("c\u2028c", "3"), ("e", "y")]
    said = capsys.readouterr().err
    assert "left out 1 row(s) with no text (missing, not a string, or blank) (line 2)" in said
    assert "left out 1 row(s) with no label (missing, null, or not a string or integer) (line 4)" in said
    assert "left out 1 row(s) with a text over 30 characters (line 6)" in said
    path.write_text('{"text": "x", "label": "a"}\n{oops\n')
    with pytest.raises(StreamFileError, match=r"train\.jsonl, line 2: not JSON"):
        from_jsonl(path)
    with pytest.raises(StreamFileError, match="cannot be read"):
        from_jsonl(tmp_path / "missing.jsonl")


def test_files_of_one_name_in_other_folders_are_streams_of_their_own() -> None:
    from benchmarks.quality.served import stream_names

    paths = [Path("d/emotion/train.jsonl"), Path("d/trec6/train.jsonl"), Path("x/news.jsonl")]
    assert stream_names(paths) == ["emotion-train", "trec6-train", "news"]
    assert stream_names([Path("a/t.jsonl"), Path("b/a/t.jsonl")]) == ["a-t-1", "a-t-2"]
    assert stream_names([Path("x/banking.jsonl")], taken=["banking"]) == ["x-banking"]  # beside --streams banking


def test_quarters_are_four_whatever_the_count_and_nothing_scored_is_no_zero() -> None:
    events = [(f"t{i}", "a" if i % 3 else "b") for i in range(10)]
    stream = Stream("s", "test", events, [Phase("one", 0, [])])
    served = {"answers": ["a"] * 10, "versions": [1] * 10, "feed_behind_s": 0.0}
    result = score(stream, QUICK, served, 10, compare=False)
    assert len(result["served_by_quarter"]) == 4  # 2, 3, 2 and 3 events: five "quarters" before
    # b a a b a a b a a b: the label seen most before each event is right at events 5, 7 and 8 only
    # (none before the first; a tie goes to the label seen first).
    assert result["majority_baseline"] == 0.3
    table = markdown({"suite": "q", "rate": 20.0, "machine": "m", "streams": {"s": result}}, "c").splitlines()
    header, rule, row = table[4:7]
    assert header.count("|") == rule.count("|") == row.count("|")  # a trailing empty column before
    assert header.count("majority") == 1
    from benchmarks.quality.served import accuracy

    assert accuracy([], []) is None
