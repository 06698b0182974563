"""Event sources: where raw labeled records come from (``demo``, ``file:PATH``, ``file:-``, ``kafka://``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from dynft.errors import SourceError
from dynft.settings import KafkaSettings, SourceSettings
from dynft.sources.base import Intake, Positions, Record, Source, furthest
from dynft.sources.demo import DemoSource
from dynft.sources.file import FileSource

__all__ = ["DemoSource", "FileSource", "Intake", "Positions", "Record", "Source", "furthest", "open_source"]


def open_source(
    settings: SourceSettings,
    kafka: KafkaSettings,
    metrics: CollectorRegistry | None = None,
    max_record_bytes: int = 1 << 20,
) -> Source:
    """The source named by ``settings.uri`` (not yet opened); lines past ``max_record_bytes`` are cut."""
    uri = settings.uri
    if uri == "demo":
        return DemoSource(rate=settings.demo_rate, loop=settings.demo_loop, seed=settings.demo_seed)
    if uri.startswith("file:"):
        path = uri[len("file:") :]
        if not path:
            raise SourceError("source file: needs a path, e.g. file:events.jsonl or file:- for stdin")
        return FileSource(
            path, follow=settings.follow, poll_interval_s=settings.poll_interval_s, max_record_bytes=max_record_bytes
        )
    if uri.startswith("kafka://"):
        from dynft.metrics import KafkaMetrics
        from dynft.sources.kafka import KafkaSource
        from dynft.sources.kafka_process import KafkaProcessSource

        if kafka.consumer_process:
            return KafkaProcessSource(uri, kafka, metrics or CollectorRegistry())
        return KafkaSource(uri, kafka, KafkaMetrics(metrics or CollectorRegistry()))
    raise SourceError(f"unknown source {uri!r}: expected demo, file:PATH, file:- or kafka://HOST:PORT/TOPIC")
