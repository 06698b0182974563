"""Property: whatever arrives, each record is trained on, held out or dead-lettered, exactly once.

Arbitrary bytes, arbitrary JSON documents (integers of any size, NaN and infinities, lone
surrogates and control characters in any string, deep nesting, duplicate keys) and event-shaped
objects with hostile field values go through decode, routing (the hold-out hash, the label cap)
and tokenizing with the tiny model's real tokenizer. Nothing raises and nothing is ``internal``:
every failure these can produce has a rule. An event-shaped record that breaks rules gets the
reason of one of them; one that breaks none is not dead-lettered.
"""

from __future__ import annotations

import json
import random
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from dynft.batching import Collator, LabelMap
from dynft.deadletter import JsonlDeadLetterSink
from dynft.events import Event, Rejection, decode, task_name_problem
from dynft.metrics import TrainerMetrics
from dynft.model import load_tokenizer
from dynft.routing import Routed, Router
from dynft.settings import EventSettings, Settings
from dynft.sources import Record

LIMITS = EventSettings(max_id_chars=8, max_text_chars=12, max_label_chars=6, max_weight=100)
MAX_LABELS = 4
METRICS = CollectorRegistry()
EXAMPLES = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Characters: anything, plus lone surrogates, control characters and odd spaces made likely.
CHARS = st.one_of(
    st.characters(exclude_categories=()),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, exclude_categories=()),
    st.characters(max_codepoint=0x1F),
    st.sampled_from(" \t\u3000\u00a0\u2028"),
)
STRINGS = st.text(CHARS, max_size=10)


def string_json(text: str, escape: bool) -> str:
    """A JSON string: ``\\u`` escapes throughout, or raw characters (lone surrogates still escaped)."""
    return json.dumps(text, ensure_ascii=escape)


# JSON numbers as text, so that integers beyond what ``json.dumps`` writes (4300 digits) appear.
NUMBERS = st.one_of(
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(json.dumps),  # NaN, Infinity, -Infinity
    st.integers(1, 6000).map(lambda n: "9" * n),
    st.integers(1, 6000).map(lambda n: "-1" + "0" * n),
    st.sampled_from(["1e400", "-1e400", "1e-400", "-0", "-0.0", "1E+2", "0.5"]),
)
SCALARS = st.one_of(
    st.sampled_from(["null", "true", "false"]),
    NUMBERS,
    st.builds(string_json, STRINGS, st.booleans()),
)
KEYS = st.one_of(st.sampled_from(["id", "text", "label", "weight", "ts", "task"]), STRINGS)


def array(items: list[str]) -> str:
    return "[" + ", ".join(items) + "]"


def obj(pairs: list[tuple[str, str]]) -> str:  # a list of pairs: keys may repeat
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in pairs) + "}"


JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(array), st.lists(st.tuples(KEYS, inner), max_size=6).map(obj)
    ),
    max_leaves=12,
)
DEEP = st.integers(150, 4000).map(lambda depth: "[" * depth + "]" * depth)  # beyond pydantic's and Python's parsers


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Router:
    sink = JsonlDeadLetterSink(tmp_path_factory.mktemp("dead") / "dead.jsonl", "property")
    s = Settings(events=LIMITS)
    return Router(s, LabelMap(capacity=MAX_LABELS), sink, TrainerMetrics(METRICS))


@pytest.fixture(scope="module")
def collator(tiny_model_dir: Path, router: Router) -> Collator:
    return Collator(load_tokenizer(tiny_model_dir), 16, router.labels)


def positions() -> Iterator[int]:
    n = 0
    while True:
        n += 1
        yield n


_next = positions()


def route_all(router: Router, collator: Collator, raws: list[bytes]) -> tuple[Routed, list[Event]]:
    """Route ``raws`` and tokenize the fresh events; checks that each record ends in exactly one place."""
    records = [Record(raw, "property", next(_next)) for raw in raws]
    routed = router.route(records)
    batch, dead = router.collate(collator, routed.fresh, [])
    held_out, unscreened = router.screen(collator, routed.held_out)
    assert dead == unscreened == [], "tokenizing failed for a record decode accepted"
    assert len(held_out) == len(routed.held_out)
    trained = batch.events if batch is not None else []
    assert len(trained) == len(routed.fresh)
    places = [r for r, _ in routed.fresh] + [r for r, _ in routed.held_out] + [r for r, _ in routed.dead]
    assert sorted(map(id, places)) == sorted(map(id, records)), "a record is lost or in two places"
    internal = METRICS.get_sample_value("dynft_events_rejected_total", {"reason": "internal"})
    assert not internal, "internal: an exception no rule foresaw"
    return routed, trained


@EXAMPLES
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=8))
def test_arbitrary_bytes_each_end_in_exactly_one_place(router: Router, collator: Collator, raws: list[bytes]) -> None:
    route_all(router, collator, raws)


@EXAMPLES
@given(st.lists(st.one_of(JSON, DEEP), min_size=1, max_size=6))
@example([obj([("id", '"1"'), ("text", '"hi"'), ("label", '"a"'), ("weight", "1" + "0" * 400)])])  # issue #12
@example([obj([("id", '"\\ud800"'), ("text", '"hi"'), ("label", '"a"')])])  # issue #12
def test_arbitrary_json_documents_each_end_in_exactly_one_place(
    router: Router, collator: Collator, docs: list[str]
) -> None:
    raws = [d.encode("utf-8", "backslashreplace") for d in docs]  # raw lone surrogates as JSON escapes
    route_all(router, collator, raws)


def broken_rules(fields: dict[str, object]) -> set[str]:
    """The rules an event-shaped record (string id, text and label; any weight) breaks."""
    broken = set()
    limits = {"id": LIMITS.max_id_chars, "text": LIMITS.max_text_chars, "label": LIMITS.max_label_chars}
    for name, limit in limits.items():
        value = fields[name]
        assert isinstance(value, str)
        if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
            broken.add("invalid_string")
        # Only space, control, format or combining characters (none to read): empty too.
        invisible = all(unicodedata.category(c) in ("Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "Me") for c in value)
        if not value or value.isspace() or invisible:
            broken.add(f"empty_{name}")
        if len(value) > limit:
            broken.add(f"{name}_too_long")
    if "weight" in fields:
        weight = float(str(fields["weight"]).replace("Infinity", "inf")) if fields["weight"] != "NaN" else None
        if weight is None or not 0 <= weight <= LIMITS.max_weight:
            broken.add("invalid_weight")
    return broken


EVENT_FIELDS = st.fixed_dictionaries(
    {"id": STRINGS, "text": STRINGS, "label": st.text(CHARS, max_size=8) | st.sampled_from(["a", "b"])},
    optional={"weight": NUMBERS, "task": STRINGS},
)


@EXAMPLES
@given(EVENT_FIELDS, st.booleans(), st.randoms(use_true_random=False))
def test_event_shaped_records_get_the_reason_of_a_rule_they_break(
    router: Router, collator: Collator, fields: dict[str, str], escape: bool, rng: random.Random
) -> None:
    pairs = [(k, v if k == "weight" else string_json(v, escape)) for k, v in fields.items()]
    rng.shuffle(pairs)
    raw = obj(pairs).encode("utf-8", "backslashreplace")
    labels_before = set(router.labels.labels)
    routed, _ = route_all(router, collator, [raw])
    broken = broken_rules(fields)
    if "task" in fields and any(0xD800 <= ord(c) <= 0xDFFF for c in fields["task"]):
        broken.add("invalid_string")
    elif "task" in fields and task_name_problem(fields["task"]) is not None:
        broken.add("invalid_task")  # a task names paths and metric labels: [A-Za-z0-9_.-], short
    if routed.dead:
        rejection = decode(raw, LIMITS)  # the routing's reason: decode's, or else the label cap
        reason = rejection.reason if isinstance(rejection, Rejection) else "too_many_labels"
        beyond_cap = fields["label"] not in labels_before and len(labels_before) >= MAX_LABELS
        assert reason in broken or (not broken and reason == "too_many_labels" and beyond_cap), (reason, broken)
    else:
        assert not broken, f"accepted, but breaks {broken}"
