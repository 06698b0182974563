"""The quality benchmark's streams: each drift point is a change of what arrives."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.quality.streams import build, letters  # noqa: E402
from benchmarks.quality.suites import FULL  # noqa: E402


def test_letters_ignore_the_spacing_that_tells_sst2_from_mr() -> None:
    assert letters("it 's not a movie , is n't it ?") == letters("It's not a movie, isn't it?")
    assert letters("a good film") != letters("a bad film")


def test_the_domain_streams_movie_phases_share_no_sentence_and_tweets_come_between() -> None:
    stream = build("domain", FULL.sizes)
    assert [p.name for p in stream.phases] == ["SST-2", "airline tweets", "MR"]
    starts = [p.start for p in stream.phases] + [len(stream.events)]
    phases = [stream.events[a:b] for a, b in itertools.pairwise(starts)]
    assert [len(p) for p in phases] == [FULL.sizes.domain_per_phase] * 3
    sst2 = {letters(text) for text, _ in phases[0]} | {letters(text) for text, _ in stream.phases[0].test}
    mr = {letters(text) for text, _ in phases[2]} | {letters(text) for text, _ in stream.phases[2].test}
    assert not sst2 & mr  # SST-2 is re-tokenised MR sentences
    assert len(stream.phases[2].test) == FULL.sizes.domain_test
    assert any("@" in text for text, _ in phases[1]) and not any("@" in text for text, _ in phases[0] + phases[2])
