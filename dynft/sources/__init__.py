"""Event sources: where raw labeled records come from (``demo``, ``file:PATH``, ``file:-``)."""

from __future__ import annotations

from dynft.errors import SourceError
from dynft.settings import SourceSettings
from dynft.sources.base import Intake, Record, Source
from dynft.sources.demo import DemoSource
from dynft.sources.file import FileSource

__all__ = ["DemoSource", "FileSource", "Intake", "Record", "Source", "open_source"]


def open_source(settings: SourceSettings) -> Source:
    """The source named by ``settings.uri`` (not yet opened)."""
    uri = settings.uri
    if uri == "demo":
        return DemoSource(rate=settings.demo_rate, loop=settings.demo_loop, seed=settings.demo_seed)
    if uri.startswith("file:"):
        path = uri[len("file:") :]
        if not path:
            raise SourceError("source file: needs a path, e.g. file:events.jsonl or file:- for stdin")
        return FileSource(path, follow=settings.follow, poll_interval_s=settings.poll_interval_s)
    raise SourceError(f"unknown source {uri!r}: expected demo, file:PATH or file:-")
