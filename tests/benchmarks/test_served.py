"""The served-accuracy protocol's scoring and daemon settings (the daemon itself is left out: slow)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.quality.served import daemon_env, markdown, score  # noqa: E402
from benchmarks.quality.streams import Phase, Stream  # noqa: E402
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
    assert int(env["DYNFT_TRAINER__FRESHEST_FIRST_BACKLOG"]) > 0
    assert settings.source.follow and settings.server.port == 8123 and settings.state_dir == tmp_path / "state"
    assert settings.registry.publish_interval_s == 20.0 and settings.model.max_length == QUICK.max_length
