"""Hostile records, each kind named, with what must become of it (shared by the end-to-end tests).

Settings the kinds are made for: ``events.max_record_bytes=MAX_RECORD_BYTES`` and
``trainer.max_labels=MAX_LABELS``, on a stream whose good events carry ``MAX_LABELS`` labels
(so that a further label is beyond the cap), with the hostile records after the first good ones.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_RECORD_BYTES = 1 << 16
MAX_LABELS = 3
SETTINGS = (f"events.max_record_bytes={MAX_RECORD_BYTES}", f"trainer.max_labels={MAX_LABELS}")


@dataclass(frozen=True)
class Hostile:
    raw: bytes
    reason: str | None  # the dead-letter reason; None: a valid event despite appearances
    event_id: str | None  # the id the ledger knows it by; None: no usable id (the dead letter holds it)


def _record(event_id: bytes, tail: bytes, text: bytes = b'"w1 alpha1 w2"', label: bytes = b'"alpha"') -> bytes:
    return b'{"id": ' + event_id + b', "text": ' + text + b', "label": ' + label + tail + b"}"


HOSTILE: dict[str, Hostile] = {
    # The two records of issue #12 that crash-looped the trainer.
    "weight_int_beyond_float": Hostile(
        _record(b'"h-bigint"', b', "weight": 1' + b"0" * 400), "invalid_weight", "h-bigint"
    ),
    "lone_surrogate_in_id": Hostile(_record(b'"h-\\ud800"', b""), "invalid_string", None),
    # Numbers.
    "weight_int_beyond_int_parser": Hostile(
        _record(b'"h-hugeint"', b', "weight": ' + b"9" * 5000), "invalid_weight", "h-hugeint"
    ),
    "weight_float_overflow": Hostile(_record(b'"h-1e400"', b', "weight": 1e400'), "invalid_weight", "h-1e400"),
    "weight_nan_literal": Hostile(_record(b'"h-nan"', b', "weight": NaN'), "invalid_weight", "h-nan"),
    "weight_above_max_weight": Hostile(_record(b'"h-heavy"', b', "weight": 1000.5'), "invalid_weight", "h-heavy"),
    "weight_negative": Hostile(_record(b'"h-negative"', b', "weight": -3'), "invalid_weight", "h-negative"),
    # Strings no tokenizer, database or UTF-8 sink takes.
    "lone_surrogate_in_text": Hostile(
        _record(b'"h-surtext"', b"", text=b'"w1 \\udc80 alpha1"'), "invalid_string", "h-surtext"
    ),
    "lone_surrogate_in_label": Hostile(
        _record(b'"h-surlabel"', b"", label=b'"alpha\\udfff"'), "invalid_string", "h-surlabel"
    ),
    "lone_surrogate_in_ts": Hostile(_record(b'"h-surts"', b', "ts": "\\ud800"'), "invalid_ts", "h-surts"),
    # Structure.
    "nesting_beyond_the_parser": Hostile(
        _record(b'"h-deep"', b', "x": ' + b"[" * 5000 + b"]" * 5000), "nested_too_deep", None
    ),
    "truncated_record": Hostile(b'{"id": "h-cut", "text": "w1 al', "malformed_json", None),
    "not_utf8": Hostile(_record(b'"h-latin1"', b"", text=b'"caf\xe9 alpha1"'), "not_utf8", None),
    "nul_bytes": Hostile(b"\x00\x00\x00\x00", "malformed_json", None),
    "json_array": Hostile(b'[{"id": "h-array", "text": "w1 alpha1", "label": "alpha"}]', "not_an_object", None),
    "json_string": Hostile(b'"w1 alpha1"', "not_an_object", None),
    "record_too_large": Hostile(
        _record(b'"h-large"', b"", text=b'"' + b"w1 " * (MAX_RECORD_BYTES // 3) + b'"'), "record_too_large", None
    ),
    # Types and values.
    "id_is_a_number": Hostile(_record(b"7", b""), "wrong_type", None),
    "label_is_an_object": Hostile(_record(b'"h-labelobj"', b"", label=b'{"a": 1}'), "wrong_type", "h-labelobj"),
    "label_missing": Hostile(b'{"id": "h-nolabel", "text": "w1 alpha1"}', "missing_field", "h-nolabel"),
    "whitespace_text": Hostile(_record(b'"h-blank"', b"", text=b'" \\t\\u3000 "'), "empty_text", "h-blank"),
    "label_given_twice": Hostile(_record(b'"h-dup-label"', b', "label": "beta"'), "duplicate_field", "h-dup-label"),
    "new_label_beyond_max_labels": Hostile(
        _record(b'"h-newlabel"', b"", label=b'"user-8812"'), "too_many_labels", "h-newlabel"
    ),
    # Valid despite appearances: trained or held out, under these ids.
    "control_characters": Hostile(
        _record(b'"h-ctrl\\u0001"', b"", text=b'"w1 alpha1 \\u0000\\u001b[0m"'), None, "h-ctrl\x01"
    ),
    "duplicate_unknown_keys": Hostile(_record(b'"h-dup"', b', "x": 1, "x": 2'), None, "h-dup"),
    "nan_in_an_unknown_field": Hostile(_record(b'"h-extra"', b', "score": NaN, "n": 1' + b"0" * 5000), None, "h-extra"),
}

REJECTED = {name: h for name, h in HOSTILE.items() if h.reason is not None}
