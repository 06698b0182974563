from __future__ import annotations

import pytest

from dynft.events import REASONS, Event, Rejection, decode
from dynft.settings import EventSettings

LIMITS = EventSettings(max_text_chars=20, max_label_chars=8, max_id_chars=10, max_record_bytes=200)

# One record for every reason a record can be refused, and the reason it must get.
BAD = {
    "record_too_large": b'{"id": "1", "text": "' + b"x" * 300 + b'", "label": "a"}',
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
}


def test_every_reason_has_a_sample() -> None:
    assert set(BAD) == set(REASONS)


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


def test_unknown_fields_are_ignored() -> None:
    event = decode(b'{"id": "1", "text": "hi", "label": "a", "teacher_scores": {"a": 0.9}}', LIMITS)
    assert isinstance(event, Event)


def test_default_text_limit_is_8192_characters() -> None:
    ok = b'{"id": "1", "text": "' + b"a" * 8192 + b'", "label": "x"}'
    too_long = b'{"id": "1", "text": "' + b"a" * 8193 + b'", "label": "x"}'
    assert isinstance(decode(ok, EventSettings()), Event)
    rejected = decode(too_long, EventSettings())
    assert isinstance(rejected, Rejection) and rejected.reason == "text_too_long"
