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
import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import msgspec
from pydantic import (
    BaseModel,
    ConfigDict,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from dynft.blank import NOTHING_VISIBLE, blank
from dynft.settings import EventSettings
from dynft.teacher import normalised, top_label

TEACHER_FIELDS = ("teacher", "teacher_logits", "teacher_temperature", "label_from_teacher")
# Set by decoding, never by a record: one that says it is an unknown field (ignored), or its label
# would be left out of the loss while the event is still held out and scored under it.
DERIVED = "label_from_teacher"

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
    "nested_too_deep",
    "invalid_string",
    "duplicate_field",  # a field of the event given twice in one object: which value is meant is unknown
    "invalid_teacher",  # a malformed teacher distribution (see dynft.teacher)
    "invalid_temperature",  # a teacher_temperature that is not finite and > 0, or without logits
    "too_many_labels",  # given by routing (dynft.routing), not by decode
    "invalid_task",  # a task name that is too long or has characters outside [A-Za-z0-9_.-] (dynft.tasks)
    "too_many_tasks",  # a new task beyond tasks.max_tasks, given by routing
    "wrong_partition",  # kafka.sharded: a task's event on a partition other than its key's, given by routing
    "internal",  # an exception no rule foresaw; the detail names its type
]
REASONS: tuple[Reason, ...] = Reason.__args__  # type: ignore[attr-defined]

DEFAULT_TASK = "default"  # the task of events without a ``task`` field: a single-task stream is this one task
MAX_TASK_CHARS = 64
# Task names become directory names (registry/tasks/<task>) and metric label values.
_TASK_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_ESCAPED_KEY = re.compile(rb'[{,]\s*"(?:[^"\\]|\\[^u])*\\u(?:[^"\\]|\\.)*"\s*:')  # a key with a \u escape


def task_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a task, or None when it can.

    >>> task_name_problem("intents"), task_name_problem("../etc")
    (None, "task '../etc' is not a name of [A-Za-z0-9_.-] (and not . or ..)")
    """
    if len(name) > MAX_TASK_CHARS:
        return f"task name of {len(name)} chars > {MAX_TASK_CHARS}"
    if not _TASK_NAME.fullmatch(name) or name in (".", ".."):
        return f"task {name[:MAX_TASK_CHARS]!r} is not a name of [A-Za-z0-9_.-] (and not . or ..)"
    return None


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """One labeled example, as ``decode`` makes it. Unknown extra fields of a record are ignored,
    so newer producers stay readable.

    ``teacher`` is a distribution over labels from a stronger model (see ``dynft.teacher``); after
    decoding it always holds probabilities, and ``teacher_logits``/``teacher_temperature`` are
    ``None``. ``label_from_teacher``: the producer gave no label, so ``label`` is the teacher's top
    label and the trainer learns from the teacher alone.

    A msgspec struct, not a pydantic model: one is made for every record on the ingest hot path,
    and msgspec decodes and type-checks a record into it in a sixth of pydantic's time. Making one
    by hand checks nothing: only ``decode`` (and ``from_builtins``) validate.
    """

    id: str
    text: str
    label: str
    task: str | None = None
    ts: datetime | None = None
    weight: float | int = 1.0
    teacher: dict[str, float | int] | None = None
    teacher_logits: dict[str, float | int] | None = None
    teacher_temperature: float | int | None = None
    label_from_teacher: bool = False

    @property
    def task_name(self) -> str:
        """The task this event belongs to (``default`` when the record named none)."""
        return self.task if self.task is not None else DEFAULT_TASK

    @property
    def nbytes(self) -> int:
        """Approximate memory held by this event, for the buffer's byte bound."""
        text = self.text
        size = (len(text) if text.isascii() else len(text.encode())) + len(self.id) + len(self.label) + 200
        if self.teacher is not None:
            size += sum(len(label) + 80 for label in self.teacher)  # a dict entry and its float
        return size

    def to_builtins(self) -> dict[str, Any]:
        """JSON-ready fields (``ts`` as ISO-8601), as checkpoints store an event."""
        out: dict[str, Any] = msgspec.to_builtins(self)
        return out

    @classmethod
    def from_builtins(cls, fields: dict[str, Any]) -> Event:
        """An event from ``to_builtins``'s fields (also those older checkpoints wrote), type-checked."""
        return msgspec.convert(fields, cls, strict=False)

    def replace(self, **changes: Any) -> Event:
        """A copy with ``changes`` (events are frozen)."""
        return msgspec.structs.replace(self, **changes)


class _Schema(BaseModel):
    """The record's schema in pydantic, for the slow path only: its errors name the field and the
    kind of problem (``missing``, a wrong type) that a rejection's reason is chosen by, and it
    gives a record without a label its teacher's top label. Same fields and types as ``Event``."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    id: StrictStr
    text: StrictStr
    label: StrictStr
    task: StrictStr | None = None
    ts: datetime | None = None
    weight: StrictFloat | StrictInt = 1.0
    teacher: dict[StrictStr, StrictFloat | StrictInt] | None = None
    teacher_logits: dict[StrictStr, StrictFloat | StrictInt] | None = None
    teacher_temperature: StrictFloat | StrictInt | None = None
    label_from_teacher: StrictBool = False

    @model_validator(mode="before")
    @classmethod
    def _label_from_teacher(cls, data: Any) -> Any:
        """A record with a teacher and no label takes the teacher's top label (validated later, in ``_check``)."""
        if isinstance(data, dict) and "label" not in data:
            scores = data.get("teacher") if data.get("teacher") is not None else data.get("teacher_logits")
            top = top_label(scores)
            if top is not None:
                return {**data, "label": top, "label_from_teacher": True}
        return data


@dataclass(frozen=True)
class Rejection:
    """A record that could not become an event, with the reason and the bytes as they arrived.

    ``event_id`` is the record's id where it had a usable one (a non-empty string within the
    limits), so that the ledger can answer for it by id. ``detail`` is always encodable as
    UTF-8: lone surrogates in it are written as ``\\udXXX`` escapes, so every sink can store it.
    """

    reason: Reason
    detail: str
    raw: bytes
    event_id: str | None = None

    def __post_init__(self) -> None:
        if not self.detail.isascii():
            object.__setattr__(self, "detail", _encodable(self.detail))


_FAST = msgspec.json.Decoder(Event)  # strict: a number is no string, a bool no number
# Each field's key as it appears in a record; a second one sends the record down the slow path,
# where a field given twice is refused. msgspec, as JSON parsers do, keeps the last one silently.
_KEYS = tuple(f'"{name}"'.encode() for name in Event.__struct_fields__ if name != DERIVED)


class _Repeated(dict[str, Any]):
    """A JSON object in which some keys appear more than once (``repeated``), the last value kept."""

    repeated: list[str]


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json``'s object hook: a dict, or a ``_Repeated`` one that names the keys given twice."""
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    marked = _Repeated(obj)
    marked.repeated = [key for key, n in Counter(key for key, _ in pairs).items() if n > 1]
    return marked


def decode(raw: bytes, limits: EventSettings) -> Event | Rejection:
    """Decode one raw record (a JSON object in UTF-8) into an ``Event`` or a ``Rejection``."""
    if len(raw) > limits.max_record_bytes:
        return Rejection("record_too_large", f"{len(raw)} bytes > {limits.max_record_bytes}", raw)
    if not raw:  # said plainly: json's "Expecting value at line 1 column 1" puzzled a user
        return Rejection("malformed_json", "the record is empty (a Kafka tombstone has no value)", raw)
    try:  # fast path: msgspec parses and type-checks a well-formed event in one pass
        event = _FAST.decode(raw)
    except (msgspec.DecodeError, RecursionError):  # DecodeError: also its ValidationError, a subclass
        return _diagnose(raw, limits)  # slow path: find out why, in order (or give a label from the teacher)
    # A teacher's labels or a field may be given twice, which msgspec does not tell: the slow path
    # does. A key may hide behind escapes ("\u0074ext" is "text"), and msgspec skips an unknown
    # field without reading it as UTF-8: such records take the slow path too.
    if (
        event.teacher is not None
        or event.teacher_logits is not None
        or event.label_from_teacher  # given by the record: ignored, on the slow path
        or any(raw.count(k) > 1 for k in _KEYS)
        or (b"\\u" in raw and _ESCAPED_KEY.search(raw) is not None)
        or not (raw.isascii() or _utf8(raw))
    ):
        return _diagnose(raw, limits)
    return _check(event, raw, limits)


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _diagnose(raw: bytes, limits: EventSettings) -> Event | Rejection:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejection("not_utf8", f"invalid UTF-8 at byte {exc.start}", raw)
    try:
        obj = json.loads(text, parse_int=_parse_int, object_pairs_hook=_object)
    except json.JSONDecodeError as exc:
        # json's messages that name a place end in " at" ("Unterminated string starting at").
        where = f"line {exc.lineno} column {exc.colno}"
        return Rejection("malformed_json", f"{exc.msg.removesuffix(' at')} at {where}", raw)
    except RecursionError:  # valid JSON, but deeper than the parser's stack (pydantic's stops at 200)
        return Rejection("nested_too_deep", "JSON nested too deeply to parse", raw)
    if not isinstance(obj, dict):
        return Rejection("not_an_object", f"expected a JSON object, got {json_type(obj)}", raw)
    return _repeated(obj, raw, limits) or _validate(obj, raw, limits)


def _repeated(obj: dict[str, Any], raw: bytes, limits: EventSettings) -> Rejection | None:
    """A field of the event given twice, or a teacher's label given twice; unknown fields may repeat."""
    given_twice = [key for key in getattr(obj, "repeated", ()) if key in Event.__struct_fields__ and key != DERIVED]
    id_ = None if "id" in given_twice else _usable_id(obj.get("id"), limits)
    if given_twice:
        return Rejection(
            "duplicate_field", f"field {given_twice[0]!r} is given twice; which value is meant is unknown", raw, id_
        )
    for field in ("teacher", "teacher_logits"):
        labels = getattr(obj.get(field), "repeated", None)
        if labels:
            return Rejection("invalid_teacher", f"{field}: label {labels[0][:64]!r} is given twice", raw, id_)
    return None


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type, as a producer knows it.

    >>> json_type(None), json_type([1]), json_type(True), json_type(2.5)
    ('null', 'an array', 'a boolean', 'a number')
    """
    if value is None:
        return "null"
    for kind, name in ((bool, "a boolean"), ((int, float), "a number"), (str, "a string"), (list, "an array")):
        if isinstance(value, kind):
            return name
    return "an object"


def _parse_int(digits: str) -> int | float:
    """A JSON integer; one longer than Python converts (``sys.get_int_max_str_digits``) is an infinity.

    Such a number is no valid weight (rejected as ``invalid_weight``) and is ignored in an unknown field.
    """
    try:
        return int(digits)
    except ValueError:
        return -math.inf if digits.startswith("-") else math.inf


def _validate(obj: dict[str, Any], raw: bytes, limits: EventSettings) -> Event | Rejection:
    id_ = _usable_id(obj.get("id"), limits)
    ts = obj.get("ts")
    if ts is not None and not isinstance(ts, str):
        return Rejection("invalid_ts", f"ts must be an ISO-8601 string, got {json_type(ts)}", raw, id_)
    try:
        given = {key: value for key, value in obj.items() if key != DERIVED}
        event = Event(**dict(_Schema.model_validate({**given, "ts": None})))
    except ValidationError as exc:
        errors = exc.errors()
        # A teacher of the wrong shape is named as such, even where it also leaves the label missing.
        teacher_errors = [e for e in errors if e["loc"] and e["loc"][0] in TEACHER_FIELDS]
        err = teacher_errors[0] if teacher_errors else errors[0]
        field = ".".join(str(p) for p in err["loc"])
        reason: Reason = "missing_field" if err["type"] == "missing" else "wrong_type"
        if teacher_errors:
            reason = "invalid_temperature" if err["loc"][0] == "teacher_temperature" else "invalid_teacher"
        elif reason == "missing_field" and err["loc"] == ("label",) and _has_teacher(obj):
            no_label: tuple[Reason, str] = ("invalid_teacher", "a record without a label needs a non-empty teacher")
            reason, detail = _teacher_problem(obj, limits) or no_label
            return Rejection(reason, detail, raw, id_)
        return Rejection(reason, f"{field}: {err['msg']}", raw, id_)
    # Only this slow path can see lone surrogates (pydantic's JSON parser refuses them), and no
    # tokenizer, database or UTF-8 sink takes them: the record is refused here, naming the field.
    for name in ("id", "text", "label", "task"):
        if name == "label" and event.label_from_teacher:
            continue  # the teacher's top label: checked with the teacher's, below, and named so
        value = getattr(event, name)
        if value is not None and not value.isascii() and _encodable(value) != value:
            return Rejection("invalid_string", f"{name}: contains a lone surrogate (not encodable as UTF-8)", raw, id_)
    for scores in (event.teacher, event.teacher_logits):
        bad = next((k for k in scores or () if not k.isascii() and _encodable(k) != k), None)
        if bad is not None:
            return Rejection("invalid_teacher", "a teacher label contains a lone surrogate", raw, id_)
    checked = _check(event, raw, limits)
    if isinstance(checked, Rejection) or ts is None:
        return checked
    try:
        parsed = datetime.fromisoformat(ts)
    except ValueError:
        return Rejection("invalid_ts", f"ts is not ISO-8601: {ts[:64]!r}", raw, id_)
    return event.replace(ts=parsed)


def _check(event: Event, raw: bytes, limits: EventSettings) -> Event | Rejection:
    """The limits and emptiness checks that types alone do not express (on the ingest hot path)."""
    id_, text, label = event.id, event.text, event.label
    if blank(id_):
        return Rejection("empty_id", "id is empty" if not id_ else "id has no visible character", raw)
    if len(id_) > limits.max_id_chars:
        return Rejection("id_too_long", f"{len(id_)} chars > {limits.max_id_chars}", raw)
    if blank(text):
        return Rejection("empty_text", "text is empty" if not text else NOTHING_VISIBLE.format("text"), raw, id_)
    if blank(label):
        if event.label_from_teacher:  # the producer gave no label: the teacher's top one is blank
            return Rejection("invalid_teacher", "the teacher's top label is empty", raw, id_)
        return Rejection("empty_label", "label is empty" if not label else NOTHING_VISIBLE.format("label"), raw, id_)
    if len(text) > limits.max_text_chars:
        return Rejection("text_too_long", f"{len(text)} chars > {limits.max_text_chars}", raw, id_)
    if len(label) > limits.max_label_chars:
        return Rejection("label_too_long", f"{len(label)} chars > {limits.max_label_chars}", raw, id_)
    problem = task_name_problem(event.task) if event.task is not None else None
    if problem is not None:
        return Rejection("invalid_task", problem, raw, id_)
    weight = event.weight
    # Comparisons, not float(): NaN fails both, and an integer of any size compares exactly.
    if weight != 1.0 and not 0 <= weight <= limits.max_weight:
        return Rejection(
            "invalid_weight", f"weight must be between 0 and {limits.max_weight:g}, got {_shown(weight)}", raw, id_
        )
    if event.teacher is None and event.teacher_logits is None and event.teacher_temperature is None:
        return (
            Rejection("invalid_teacher", "label_from_teacher without a teacher", raw, id_)
            if event.label_from_teacher
            else event
        )
    return _check_teacher(event, raw, limits)


def _check_teacher(event: Event, raw: bytes, limits: EventSettings) -> Event | Rejection:
    """The teacher's rules (``dynft.teacher``); a valid one is stored as probabilities."""
    probs = normalised(event.teacher, event.teacher_logits, event.teacher_temperature, limits.max_label_chars)
    if isinstance(probs, tuple):
        return Rejection(probs[0], probs[1], raw, event.id)
    return event.replace(teacher=probs, teacher_logits=None, teacher_temperature=None)


def _teacher_problem(obj: dict[str, Any], limits: EventSettings) -> tuple[Reason, str] | None:
    """The rule the teacher of a record without a label breaks (a NaN score, say), so it gave no label."""
    probs, logits = obj.get("teacher"), obj.get("teacher_logits")
    if not all(scores is None or isinstance(scores, dict) for scores in (probs, logits)):
        return None  # the wrong type: pydantic's own message tells that
    problem = normalised(probs, logits, obj.get("teacher_temperature"), limits.max_label_chars)
    return problem if isinstance(problem, tuple) else None


def _has_teacher(obj: dict[str, Any]) -> bool:
    return obj.get("teacher") is not None or obj.get("teacher_logits") is not None


def _usable_id(value: object, limits: EventSettings) -> str | None:
    """``value`` if it could key the ledger: a non-blank string within the limit, encodable as UTF-8."""
    if not isinstance(value, str) or blank(value) or len(value) > limits.max_id_chars:
        return None
    return value if value.isascii() or _encodable(value) == value else None


def _shown(number: float) -> str:
    """A number for a message; ``str`` of an integer beyond 4300 digits raises, so those are summarised."""
    if isinstance(number, int) and abs(number) >= 10**18:
        return f"an integer of {number.bit_length()} bits"
    return repr(number)


def _encodable(text: str) -> str:
    """``text`` with lone surrogates written as ``\\udXXX`` escapes (so it encodes as UTF-8)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
