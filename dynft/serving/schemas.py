"""The HTTP API's request and response bodies (pydantic models), as its OpenAPI schema declares them.

The routes that use them are in ``dynft.serving.app``.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable reason, e.g. invalid_request, text_too_long, not_ready")
    message: str = Field(description="what was wrong, for a person")


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error statuses: they all share the ``ErrorBody`` shape."""
    return {status: {"model": ErrorBody, "description": HTTPStatus(status).phrase} for status in statuses}


# A character that is not whitespace as ``str.strip`` sees it, spelled out: regex engines disagree
# on what ``\s`` covers (Python's includes U+001C-U+001F, ECMA's and Rust's do not), and the
# schema's pattern must accept exactly the texts the server does not reject as empty.
NOT_BLANK = "[^\\u0009-\\u000d\\u001c-\\u0020\\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]"


def is_blank(text: str) -> bool:
    """True when ``text`` has no character matching ``NOT_BLANK``, i.e. ``not text.strip()``.

    >>> import re, sys
    >>> all((re.fullmatch(NOT_BLANK, chr(c)) is None) == chr(c).isspace() for c in range(sys.maxunicode + 1))
    True
    >>> is_blank(" \\x1c\\u3000"), is_blank(" a ")
    (True, False)
    """
    return not text.strip()


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
