"""Labeled events: the schema, and the decoder that turns raw bytes into events or rejections.

A raw record either becomes an ``Event`` or a ``Rejection`` that names the reason and keeps
the raw bytes, so that a dead-letter sink can store exactly what arrived. Decoding never
raises on bad input.

>>> from dynft.settings import EventSettings
>>> decode(b'{"id": "1", "text": "hello", "label": "greeting"}', EventSettings()).label
'greeting'
>>> decode(b'{"id": "1", "text": "", "label": "greeting"}', EventSettings()).reason
'empty_text'
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, StrictStr, ValidationError

from dynft.settings import EventSettings

Reason = Literal[
    "record_too_large",
    "not_utf8",
    "malformed_json",
    "not_an_object",
    "missing_field",
    "wrong_type",
    "empty_id",
    "empty_text",
    "empty_label",
    "id_too_long",
    "text_too_long",
    "label_too_long",
    "invalid_ts",
    "invalid_weight",
]
REASONS: tuple[Reason, ...] = Reason.__args__  # type: ignore[attr-defined]


class Event(BaseModel):
    """One labeled example. Unknown extra fields are ignored, so newer producers stay readable."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    id: StrictStr
    text: StrictStr
    label: StrictStr
    task: StrictStr | None = None
    ts: datetime | None = None
    weight: StrictFloat | StrictInt = 1.0

    @property
    def nbytes(self) -> int:
        """Approximate memory held by this event, for the buffer's byte bound."""
        text = self.text
        return (len(text) if text.isascii() else len(text.encode())) + len(self.id) + len(self.label) + 200


@dataclass(frozen=True)
class Rejection:
    """A record that could not become an event, with the reason and the bytes as they arrived."""

    reason: Reason
    detail: str
    raw: bytes


def decode(raw: bytes, limits: EventSettings) -> Event | Rejection:
    """Decode one raw record (a JSON object in UTF-8) into an ``Event`` or a ``Rejection``."""
    if len(raw) > limits.max_record_bytes:
        return Rejection("record_too_large", f"{len(raw)} bytes > {limits.max_record_bytes}", raw)
    try:  # fast path: pydantic's JSON parser validates well-formed events in one pass
        return _check(Event.model_validate_json(raw), raw, limits)
    except ValidationError:
        return _diagnose(raw, limits)  # slow path: find out why, in order


def _diagnose(raw: bytes, limits: EventSettings) -> Event | Rejection:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejection("not_utf8", f"invalid UTF-8 at byte {exc.start}", raw)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return Rejection("malformed_json", f"{exc.msg} at line {exc.lineno} column {exc.colno}", raw)
    if not isinstance(obj, dict):
        return Rejection("not_an_object", f"expected a JSON object, got {type(obj).__name__}", raw)
    return _validate(obj, raw, limits)


def _validate(obj: dict[str, Any], raw: bytes, limits: EventSettings) -> Event | Rejection:
    ts = obj.get("ts")
    if ts is not None and not isinstance(ts, str):
        return Rejection("invalid_ts", f"ts must be an ISO-8601 string, got {type(ts).__name__}", raw)
    try:
        event = Event.model_validate({**obj, "ts": None})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        reason: Reason = "missing_field" if err["type"] == "missing" else "wrong_type"
        return Rejection(reason, f"{field}: {err['msg']}", raw)
    checked = _check(event, raw, limits)
    if isinstance(checked, Rejection) or ts is None:
        return checked
    try:
        parsed = datetime.fromisoformat(ts)
    except ValueError:
        return Rejection("invalid_ts", f"ts is not ISO-8601: {ts[:64]!r}", raw)
    return event.model_copy(update={"ts": parsed})


def _check(event: Event, raw: bytes, limits: EventSettings) -> Event | Rejection:
    """The limits and emptiness checks that types alone do not express (on the ingest hot path)."""
    id_, text, label = event.id, event.text, event.label
    if not id_ or id_.isspace():
        return Rejection("empty_id", "id is empty", raw)
    if not text or text.isspace():
        return Rejection("empty_text", "text is empty", raw)
    if not label or label.isspace():
        return Rejection("empty_label", "label is empty", raw)
    if len(id_) > limits.max_id_chars:
        return Rejection("id_too_long", f"{len(id_)} chars > {limits.max_id_chars}", raw)
    if len(text) > limits.max_text_chars:
        return Rejection("text_too_long", f"{len(text)} chars > {limits.max_text_chars}", raw)
    if len(label) > limits.max_label_chars:
        return Rejection("label_too_long", f"{len(label)} chars > {limits.max_label_chars}", raw)
    weight = event.weight
    if weight != 1.0 and (not math.isfinite(weight) or weight < 0):
        return Rejection("invalid_weight", f"weight must be finite and >= 0, got {weight}", raw)
    return event
