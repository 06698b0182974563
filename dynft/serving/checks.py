"""What a request may ask, beyond what its schema's types say: the checks the routes make, each an
``ApiError`` that names what was wrong (``dynft.serving.app``)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from fastapi import Request

from dynft.blank import NOTHING_VISIBLE
from dynft.serving.engine import InferenceEngine
from dynft.serving.limits import ApiError
from dynft.serving.schemas import is_blank
from dynft.settings import Settings

MAX_LISTED = 20  # task names an unknown_task error lists (a daemon may have a thousand)


def unknown_task(engine: InferenceEngine, task: str) -> ApiError:
    known = sorted(engine.lanes)
    listed = ", ".join(known[:MAX_LISTED]) + (f" and {len(known) - MAX_LISTED} more" if len(known) > MAX_LISTED else "")
    return ApiError(404, "unknown_task", f"unknown task {task[:64]!r}; known tasks: {listed} (GET /v1/tasks)")


def repeated_key(raw: bytes) -> str | None:
    """A key given twice in the JSON object ``raw`` (which the parser read as its last value), or None."""
    repeated: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(items)
        if len(obj) != len(items):  # linear: a 1 MB body of one key repeated must not stall the loop
            repeated.append(_first_repeat(key for key, _ in items))
        return obj

    try:
        json.loads(raw, object_pairs_hook=pairs)
    except (ValueError, RecursionError):  # parsed already, by FastAPI: nothing new to say
        return None
    return repeated[0] if repeated else None


def repeated_query(request: Request) -> str | None:
    """A query parameter given twice (each route takes one value of each), or None."""
    items = request.query_params.multi_items()
    return _first_repeat(key for key, _ in items) if len({key for key, _ in items}) != len(items) else None


def _first_repeat(keys: Iterable[str]) -> str:
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            return key
        seen.add(key)
    raise ValueError("no key repeats")


def check_texts(settings: Settings, texts: list[str]) -> None:
    s = settings.server
    if len(texts) > s.max_texts:
        raise ApiError(422, "too_many_texts", f"at most {s.max_texts} texts per request, got {len(texts)}")
    for i, text in enumerate(texts):
        if is_blank(text):
            what = f"texts[{i}] is empty" if not text else NOTHING_VISIBLE.format(f"texts[{i}]")
            raise ApiError(422, "empty_text", what)
        if len(text) > settings.events.max_text_chars:
            raise ApiError(
                422,
                "text_too_long",
                f"texts[{i}] has {len(text)} chars, the limit is {settings.events.max_text_chars}",
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON's \ud800 escapes decode to unpaired surrogates
            raise ApiError(
                422, "invalid_text", f"texts[{i}] is not valid Unicode: unpaired surrogate at index {exc.start}"
            ) from exc
