"""The HTTP API's request and response bodies (pydantic models), as its OpenAPI schema declares them.

The routes that use them are in ``dynft.serving.app``.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

from dynft.blank import blank


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable reason, e.g. invalid_request, text_too_long, not_ready")
    message: str = Field(description="what was wrong, for a person")


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error statuses: they all share the ``ErrorBody`` shape."""
    return {status: {"model": ErrorBody, "description": HTTPStatus(status).phrase} for status in statuses}


def _blank_class_body() -> str:
    """The characters of the Basic Multilingual Plane that ``dynft.blank.blank`` counts as
    invisible, as the body of a regex character class in ``\\uXXXX`` ranges."""
    ranges: list[tuple[int, int]] = []
    for code in range(0x10000):
        if not blank(chr(code)):
            continue
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1] = (ranges[-1][0], code)
        else:
            ranges.append((code, code))
    return "".join(f"\\u{a:04x}" if a == b else f"\\u{a:04x}-\\u{b:04x}" for a, b in ranges)


# A visible character, spelled out as ranges of \uXXXX escapes: regex engines disagree on what
# ``\s`` covers and not all have Unicode categories, and the schema's pattern must accept exactly
# the texts the server does not reject as empty. Only the Basic Multilingual Plane is spelled out
# because a JSON Schema pattern (ECMA-262 without the u flag) sees a character beyond it as two
# surrogates, which are visible: so does the server, and a text of only invisible characters from
# the supplementary planes (tag characters, variation selectors 17-256) is answered, as any text
# is. The trainer's rule (``dynft.blank``) has no such exception; it reads no schema.
NOT_BLANK = f"[^{_blank_class_body()}]"
_VISIBLE = re.compile(NOT_BLANK)


def is_blank(text: str) -> bool:
    """True when ``text`` has no character matching ``NOT_BLANK``: empty, or only spaces, control,
    format characters (zero-width ones, the byte order mark) or combining marks with no base.

    >>> all(is_blank(chr(c)) == blank(chr(c)) for c in range(0x10000))
    True
    >>> is_blank(" \\x1c\\u3000"), is_blank("\\u200b\\ufeff\\u0301"), is_blank(" a "), is_blank("\\U000e0041")
    (True, True, False, False)
    """
    return _VISIBLE.search(text) is None


class PredictRequest(BaseModel):
    # The per-text limits (length, not blank, valid Unicode) are checked in the endpoint, for
    # errors that name the text; ``openapi`` below publishes them in the schema as well.
    model_config = ConfigDict(extra="forbid")
    texts: list[StrictStr] = Field(min_length=1, description="texts to classify")
    task: StrictStr | None = Field(None, description="the task whose adapter and labels answer (default: default)")
    top_k: int | None = Field(None, ge=1, description="return only the k most probable labels per text")

    @field_validator("top_k", mode="before")
    @classmethod
    def _json_integer(cls, value: object) -> object:
        """A JSON integer (2 or 2.0), not what lax parsing turns into one (``true``, ``"2"``)."""
        if value is None or type(value) is int or (type(value) is float and value.is_integer()):
            return value
        raise ValueError("top_k must be an integer")


class ScoredLabel(BaseModel):
    label: str
    scores: dict[str, float]


class PredictResponse(BaseModel):
    predictions: list[ScoredLabel]
    adapter_version: int = Field(description="the version that answered; 0 before the first (prototypes alone)")
    task: str
    fast_path: bool = Field(
        False, description="prototype rows answered labels this version does not know yet (server.prototypes)"
    )


class TaskInfo(BaseModel):
    task: str
    labels: list[str] = Field(description="the labels of the version answering now (empty until one is loaded)")
    serving: int | None = Field(description="the registry's serving version")
    loaded: int | None = Field(description="the version answering now")


class TasksResponse(BaseModel):
    tasks: list[TaskInfo]


class Ready(BaseModel):
    status: str
    adapter_version: int | None = Field(description="the default task's serving version; null if it has none")
    tasks: dict[str, int] = Field(description="the version serving each task that has one")
