from __future__ import annotations

import json

import pytest

from dynft.events import REASONS, Event, Rejection, decode
from dynft.settings import EventSettings

LIMITS = EventSettings(max_text_chars=20, max_label_chars=8, max_id_chars=10, max_record_bytes=4096, max_weight=100)
ROUTING_REASONS = {
    "too_many_labels",
    "too_many_tasks",
    "wrong_partition",
    "internal",
}  # given by dynft.routing, never by decode
ROOMY = EventSettings(max_weight=100)  # records of any size up to 1 MiB

# One record for every reason decode can refuse a record, and the reason it must get.
BAD = {
    "record_too_large": b'{"id": "1", "text": "' + b"x" * 4100 + b'", "label": "a"}',
    "not_utf8": b'{"id": "1", "text": "caf\xe9", "label": "a"}',
    "malformed_json": b'{"id": "1", "text": "hi", "label": ',
    "not_an_object": b'["id", "text", "label"]',
    "missing_field": b'{"id": "1", "text": "hi"}',
    "wrong_type": b'{"id": "1", "text": "hi", "label": 3}',
    "empty_id": b'{"id": " ", "text": "hi", "label": "a"}',
    "empty_text": b'{"id": "1", "text": "  ", "label": "a"}',
    "empty_label": b'{"id": "1", "text": "hi", "label": ""}',
    "id_too_long": b'{"id": "12345678901", "text": "hi", "label": "a"}',
    "text_too_long": b'{"id": "1", "text": "' + b"y" * 21 + b'", "label": "a"}',
    "label_too_long": b'{"id": "1", "text": "hi", "label": "abcdefghi"}',
    "invalid_ts": b'{"id": "1", "text": "hi", "label": "a", "ts": "yesterday"}',
    "invalid_weight": b'{"id": "1", "text": "hi", "label": "a", "weight": -1}',
    "nested_too_deep": b'{"id": "1", "text": "hi", "label": "a", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}",
    "invalid_string": b'{"id": "1", "text": "hi", "label": "a\\ud800"}',
    "invalid_teacher": b'{"id": "1", "text": "hi", "teacher": {"a": 0.5, "b": 0.2}}',
    "invalid_temperature": b'{"id": "1", "text": "hi", "teacher_logits": {"a": 1}, "teacher_temperature": 0}',
    "invalid_task": b'{"id": "1", "text": "hi", "label": "a", "task": "../x"}',
    "duplicate_field": b'{"id": "1", "text": "hi", "label": "a", "label": "b"}',
}


def test_every_reason_has_a_sample() -> None:
    assert set(BAD) == set(REASONS) - ROUTING_REASONS


# The two records of issue #12 that crash-looped the trainer, and more of their kind: each gets
# the reason of the rule it breaks, and the id where it had a usable one (the ledger's key).
HOSTILE = [
    (b'{"id": "w1", "text": "hi", "label": "a", "weight": 1' + b"0" * 400 + b"}", "invalid_weight", "w1"),
    (b'{"id": "x\\ud800", "text": "hi", "label": "a"}', "invalid_string", None),
    (b'{"id": "w2", "text": "hi", "label": "a", "weight": 1' + b"0" * 5000 + b"}", "invalid_weight", "w2"),
    (b'{"id": "w3", "text": "hi", "label": "a", "weight": -1' + b"0" * 5000 + b"}", "invalid_weight", "w3"),
    (b'{"id": "w4", "text": "hi", "label": "a", "weight": 1e400}', "invalid_weight", "w4"),
    (b'{"id": "w5", "text": "hi", "label": "a", "weight": NaN}', "invalid_weight", "w5"),
    (b'{"id": "w6", "text": "hi", "label": "a", "weight": -Infinity}', "invalid_weight", "w6"),
    (b'{"id": "w7", "text": "hi", "label": "a", "weight": 100.5}', "invalid_weight", "w7"),
    (b'{"id": "s1", "text": "\\udfff", "label": "a"}', "invalid_string", "s1"),
    (b'{"id": "s2", "text": "hi", "label": "a", "task": "\\udc80"}', "invalid_string", "s2"),
    (b'{"id": "s3", "text": "hi", "label": "a", "ts": "\\ud800"}', "invalid_ts", "s3"),
    (b'{"id": "d1", "text": "hi", "label": "a", "x": ' + b"{" * 3000, "malformed_json", None),
    (b"[" * 3000 + b"]" * 3000, "nested_too_deep", None),
    (b'{"id": "", "text": "hi", "label": "a", "weight": NaN}', "empty_id", None),
    (b'{"id": "t1", "text": "hi", "label": 1' + b"0" * 5000 + b"}", "wrong_type", "t1"),
    (b'{"id": ["t2"], "text": "hi", "label": "a"}', "wrong_type", None),
]


@pytest.mark.parametrize(
    ("raw", "reason", "event_id"), HOSTILE, ids=[f"{r}-{i}" for i, (_, r, _) in enumerate(HOSTILE)]
)
def test_hostile_records_get_the_reason_of_the_rule_they_break(raw: bytes, reason: str, event_id: str | None) -> None:
    result = decode(raw, ROOMY)
    assert isinstance(result, Rejection)
    assert (result.reason, result.event_id) == (reason, event_id)
    result.detail.encode("utf-8")  # every sink can store the detail (raises if not)


def test_the_issue_records_are_rejected_under_the_default_settings() -> None:
    big = b'{"id": "big", "text": "hi", "label": "a", "weight": 1' + b"0" * 400 + b"}"
    surrogate = b'{"id": "\\ud800", "text": "hi", "label": "a"}'
    assert [decode(r, EventSettings()).reason for r in (big, surrogate)] == ["invalid_weight", "invalid_string"]  # type: ignore[union-attr]


def test_weights_up_to_max_weight_are_kept_whole() -> None:
    for weight in (0, 0.5, 100, 100.0):
        event = decode(json.dumps({"id": "1", "text": "hi", "label": "a", "weight": weight}).encode(), LIMITS)
        assert isinstance(event, Event) and event.weight == weight
    assert (
        decode(b'{"id": "1", "text": "hi", "label": "a", "weight": 1001}', EventSettings()).reason == "invalid_weight"
    )  # type: ignore[union-attr]
    assert EventSettings().max_weight == 1000


def test_strange_but_valid_records_are_events() -> None:
    """Control characters, an unknown field given twice (a field of the event given twice is
    refused: ``duplicate_field``), nesting deeper than pydantic's parser takes but within
    Python's, huge numbers in unknown fields."""
    control = decode(b'{"id": "c\\u0000", "text": "\\u0007 \\u001b[31m", "label": "a\\u0001"}', LIMITS)
    assert isinstance(control, Event) and (control.id, control.label) == ("c\x00", "a\x01")
    duplicate = decode(b'{"id": "a", "x": 1, "text": "hi", "x": 2, "label": "x"}', LIMITS)
    assert isinstance(duplicate, Event) and duplicate.id == "a"
    nested = decode(b'{"id": "n", "text": "hi", "label": "x", "x": ' + b"[" * 500 + b"]" * 500 + b"}", LIMITS)
    assert isinstance(nested, Event) and nested.id == "n"
    huge = decode(b'{"id": "h", "text": "hi", "label": "x", "x": 1' + b"0" * 5000 + b', "y": NaN}', ROOMY)
    assert isinstance(huge, Event) and huge.id == "h"


def test_a_rejection_detail_with_a_lone_surrogate_is_stored_escaped() -> None:
    rejection = Rejection("internal", "ValueError: \ud800 here", b"")
    assert rejection.detail == "ValueError: \\ud800 here"


@pytest.mark.parametrize("reason", sorted(BAD))
def test_bad_records_are_rejected_with_their_reason_and_raw_bytes(reason: str) -> None:
    result = decode(BAD[reason], LIMITS)
    assert isinstance(result, Rejection)
    assert result.reason == reason
    assert result.raw == BAD[reason]
    assert result.detail


def test_a_good_event_with_every_field() -> None:
    raw = b'{"id": "e1", "text": "hello", "label": "greet", "task": "t", "ts": "2026-11-28T10:00:00Z", "weight": 2}'
    event = decode(raw, LIMITS)
    assert isinstance(event, Event)
    assert (event.id, event.text, event.label, event.task, event.weight) == ("e1", "hello", "greet", "t", 2)
    assert event.ts is not None and event.ts.year == 2026


def test_texts_at_the_limit_are_kept_whole() -> None:
    text = "z" * 20
    event = decode(b'{"id": "1", "text": "' + text.encode() + b'", "label": "a"}', LIMITS)
    assert isinstance(event, Event) and event.text == text


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        (b'{"id": "1", "text": "a\x00b", "label": "x"}', "Invalid control character at line 1 column 23"),
        (b'{"id": "1", "text": "ab', "Unterminated string starting at line 1 column 21"),
        (b"null", "expected a JSON object, got null"),
        (b"[1]", "expected a JSON object, got an array"),
        (b'{"id": "1", "text": "a", "label": "x", "ts": 5}', "ts must be an ISO-8601 string, got a number"),
    ],
)
def test_details_read_as_a_producer_would_say_them(raw: bytes, detail: str) -> None:
    """JSON's names for types, and json's messages without their dangling "at" (found by a review:
    "Invalid control character at at line 1", "got NoneType")."""
    rejection = decode(raw, EventSettings())
    assert isinstance(rejection, Rejection) and rejection.detail == detail


@pytest.mark.parametrize(
    ("raw", "reason", "detail", "event_id"),
    [
        (b'{"id": "1", "text": "hi", "label": "a", "label": "b"}', "duplicate_field", "field 'label'", "1"),
        (b'{"id": "1", "id": "2", "text": "hi", "label": "a"}', "duplicate_field", "field 'id'", None),
        (b'{"id": "1", "text": "hi", "teacher": {"a": 0.5, "a": 0.5}}', "invalid_teacher", "teacher: label 'a'", "1"),
        (b'{"id": "1", "text": "x", "label": "a", "teacher_logits": {"b": 1, "b": 2}}', "invalid_teacher", "", "1"),
    ],
)
def test_a_field_or_teacher_label_given_twice_is_refused(
    raw: bytes, reason: str, detail: str, event_id: str | None
) -> None:
    """JSON parsers keep a repeated key's last value silently (a review found a second "label"
    making a new label); which one a producer meant is unknown, so the record is refused."""
    rejection = decode(raw, EventSettings())
    assert isinstance(rejection, Rejection) and rejection.reason == reason, rejection
    assert rejection.detail.startswith(detail) and "given twice" in rejection.detail
    assert rejection.event_id == event_id


def test_unknown_fields_may_repeat_and_a_key_inside_them_or_a_text_is_no_repeat() -> None:
    raw = b'{"id": "1", "text": "the \\"label\\" is", "label": "a", "x": 1, "x": {"label": 2}}'
    event = decode(raw, EventSettings())
    assert isinstance(event, Event) and event.label == "a" and event.text == 'the "label" is'


def test_an_empty_record_says_so() -> None:
    """Found by a probe: a Kafka tombstone (no value) was "Expecting value at line 1 column 1"."""
    rejection = decode(b"", LIMITS)
    assert isinstance(rejection, Rejection) and rejection.reason == "malformed_json"
    assert rejection.detail == "the record is empty (a Kafka tombstone has no value)"


INVISIBLE = ["\u200b", "\x01\x02\x03", "\u00a0\u2003\u200b", "\u200d\ufeff ", "\u0301\u0301", "\x00"]


@pytest.mark.parametrize("text", INVISIBLE)
def test_a_text_without_a_visible_character_is_empty(text: str) -> None:
    """Found by a review: zero-width and control characters alone trained a label on an empty input
    (and, found by a probe, combining marks without a letter, which BERT's tokenizer strips)."""
    rejection = decode(json.dumps({"id": "1", "text": text, "label": "a"}).encode(), EventSettings())
    assert isinstance(rejection, Rejection) and rejection.reason == "empty_text"
    assert isinstance(
        decode(json.dumps({"id": "1", "text": text + "é", "label": "a"}).encode(), EventSettings()), Event
    )


@pytest.mark.parametrize("blank", INVISIBLE)
def test_a_label_id_or_teacher_label_without_a_visible_character_is_empty(blank: str) -> None:
    """Found by a probe: such labels became classes the server answered with, which nobody can read."""
    for row, reason in [
        ({"id": "1", "text": "hi", "label": blank}, "empty_label"),
        ({"id": blank, "text": "hi", "label": "a"}, "empty_id"),
        ({"id": "1", "text": "hi", "teacher": {blank: 1.0}}, "invalid_teacher"),
        ({"id": "1", "text": "hi", "label": "a", "teacher": {"a": 0.5, blank: 0.5}}, "invalid_teacher"),
    ]:
        rejection = decode(json.dumps(row).encode(), EventSettings())
        assert isinstance(rejection, Rejection) and rejection.reason == reason, (row, rejection)
    assert decode(json.dumps({"id": "1", "text": "hi", "teacher": {"": 1.0}}).encode(), LIMITS).reason == (
        "invalid_teacher"  # not empty_label: the producer gave no label, the teacher's is empty
    )


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"id": "1", "text": "good", "\\u0074ext": "other", "label": "a"}', "duplicate_field"),
        (b'{"\\u0069d": "2", "id": "1", "text": "t", "label": "a"}', "duplicate_field"),
        (b'{"id": "1", "text": "t", "label": "a", "l\\u0061bel" : "b"}', "duplicate_field"),
        (b'{"id": "1", "text": "t", "label": "a", "x": "\xff"}', "not_utf8"),
        (b'{"id": "1", "text": "t", "label": "a", "\xff\xfe": 1}', "not_utf8"),
    ],
    ids=["escaped-text", "escaped-id", "escaped-label", "bad-utf8-in-a-value", "bad-utf8-in-a-key"],
)
def test_what_the_fast_decoder_cannot_see_is_refused_as_the_slow_one_refuses_it(raw: bytes, reason: str) -> None:
    """Found by a probe: a field given twice under an escaped key ("\\u0074ext") silently replaced
    the first, and invalid UTF-8 outside the known fields was accepted (msgspec skips what it does
    not read); both are refused now. Escapes in values are ordinary and stay on the fast path."""
    rejection = decode(raw, LIMITS)
    assert isinstance(rejection, Rejection) and rejection.reason == reason, rejection
    event = decode(b'{"id": "1", "text": "caf\\u00e9, \\"\\u0074ext\\": 1", "label": "\\u00e9"}', LIMITS)
    assert isinstance(event, Event) and (event.text, event.label) == ('café, "text": 1', "é")


def test_unknown_fields_are_ignored() -> None:
    event = decode(b'{"id": "1", "text": "hi", "label": "a", "teacher_scores": {"a": 0.9}}', LIMITS)
    assert isinstance(event, Event)


def test_default_text_limit_is_8192_characters() -> None:
    ok = b'{"id": "1", "text": "' + b"a" * 8192 + b'", "label": "x"}'
    too_long = b'{"id": "1", "text": "' + b"a" * 8193 + b'", "label": "x"}'
    assert isinstance(decode(ok, EventSettings()), Event)
    rejected = decode(too_long, EventSettings())
    assert isinstance(rejected, Rejection) and rejected.reason == "text_too_long"


def test_the_slow_paths_schema_has_the_events_fields_and_defaults() -> None:
    """The pydantic schema that names a refused record's problem mirrors the msgspec event field for field."""
    from dynft.events import _Schema

    optional = Event.__struct_fields__[len(Event.__struct_fields__) - len(Event.__struct_defaults__) :]
    assert list(_Schema.model_fields) == list(Event.__struct_fields__)
    assert {name: info.default for name, info in _Schema.model_fields.items() if not info.is_required()} == dict(
        zip(optional, Event.__struct_defaults__, strict=True)
    )
