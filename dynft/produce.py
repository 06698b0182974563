"""``dynft produce``: publish a JSON Lines dataset to a Kafka topic (demos, benchmarks, tests).

Each line goes out unchanged as one record's value. With ``key_field`` the record key is that
field of the event (``label``, ``task``, ``id``), so every event with the same label or task
lands on the same partition. Brokers that refuse the client (credentials, certificate) are a
``KafkaRefusedError`` (exit 2), told from brokers that do not answer by ``kafka_connect.probe``.
"""

from __future__ import annotations

import codecs
import json
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from dynft.errors import BrokersUnavailableError, ProduceError, SourceError
from dynft.events import DEFAULT_TASK
from dynft.sources.kafka_connect import is_refusal, probe, refused


def ensure_topic(servers: list[str], topic: str, partitions: int, client: dict[str, Any]) -> int:
    """Create ``topic`` with ``partitions`` if it is missing; returns its partition count."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        probe(servers, client)
    except BrokersUnavailableError as exc:
        raise SourceError(f"cannot create or describe topic {topic}: {exc}") from exc
    try:
        admin = KafkaAdminClient(bootstrap_servers=servers, **client)
        try:
            if topic not in admin.list_topics():
                admin.create_topics(
                    {topic: {"num_partitions": partitions, "replication_factor": -1}},
                    raise_errors=False,
                    wait_for_metadata=True,
                )
            described = admin.describe_topics([topic])
        finally:
            admin.close()
    except KafkaError as exc:
        if is_refusal(exc):
            raise refused(f"topic {topic}", exc) from exc
        raise SourceError(f"cannot create or describe topic {topic} on {','.join(servers)}: {exc}") from exc
    return len(described[0]["partitions"])


def lines(path: Path) -> Iterator[bytes]:
    if str(path) == "-":
        import sys

        yield from _split(sys.stdin.buffer)
        return
    try:
        with open(path, "rb") as fh:
            yield from _split(fh)
    except OSError as exc:
        raise SourceError(f"{path}: cannot read ({exc.strerror})") from exc


def _split(fh: Iterable[bytes]) -> Iterator[bytes]:
    """Lines without their ends, and the first without a UTF-8 byte order mark (as the file source
    reads it: a record sent with it would be dead-lettered as malformed JSON)."""
    for number, line in enumerate(fh):
        if number == 0 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8) :]
        yield line.rstrip(b"\r\n")


def key_of(line: bytes, field: str | None) -> bytes | None:
    if field is None:
        return None
    try:
        value = json.loads(line).get(field)
    except (ValueError, AttributeError, RecursionError):  # RecursionError: nested deeper than json parses
        return None  # a malformed line still goes out, unkeyed
    if value is None and field == "task":
        value = DEFAULT_TASK  # an event without a task is the default task's: keyed alike (kafka.sharded)
    # A lone surrogate (a \\ud800 escape) cannot be UTF-8: kept as its escape, the record is still sent
    # (and dead-lettered by the daemon, which names why).
    return None if value is None else str(value).encode("utf-8", "backslashreplace")


def produce(
    path: Path,
    servers: list[str],
    topic: str,
    client: dict[str, Any],
    rate: float = 0.0,
    key_field: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Send every non-blank line of ``path``; ``rate`` caps records per second (0: no cap)."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    try:
        probe(servers, client)
        producer = KafkaProducer(bootstrap_servers=servers, acks="all", linger_ms=10, batch_size=256 * 1024, **client)
    except BrokersUnavailableError as exc:
        raise SourceError(f"cannot reach {','.join(servers)}: {exc}") from exc
    except KafkaError as exc:
        if is_refusal(exc):
            raise refused(f"producing to {topic}", exc) from exc
        raise SourceError(f"cannot reach {','.join(servers)}: {exc}") from exc
    started, sent = time.monotonic(), 0
    refused_lines: list[str] = []  # appended by the producer's thread too (errbacks)

    def refusal(number: int) -> Callable[[BaseException], None]:
        return lambda exc: refused_lines.append(f"line {number}: {type(exc).__name__}: {str(exc)[:200]}")

    try:
        for number, line in enumerate(lines(path), 1):
            if not line.strip():
                continue
            try:  # one record the client or the broker refuses (too large, say) stops none of the others
                future = producer.send(topic, value=line, key=key_of(line, key_field))
            except KafkaError as exc:
                refusal(number)(exc)
                continue
            future.add_errback(refusal(number))
            sent += 1
            if progress is not None:
                progress(1)
            if rate > 0:
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        producer.flush()
    finally:
        producer.close()
    if refused_lines:
        raise ProduceError(
            f"{len(refused_lines)} record(s) not produced to {topic} (the others were), e.g. {refused_lines[0]}"
        )
    return sent
