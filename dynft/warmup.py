"""A takeover's warm-up: the replay buffer and held-out window rebuilt from the stream itself.

An elected trainer that takes over on another host (``dynft.election``) has no checkpoint: it
resumes its adapter from the newest version on the versions topic, and its events from the
group's committed offsets. Its replay buffer and held-out window would start empty, so the first
steps would replay nothing and the gate would have nothing to score on. ``read_before_committed``
reads, per partition of the source topics (the term's only, when sharded), up to
``buffer.max_events`` events *before* the committed offset (events the previous trainer already
learned from), and ``refill`` hands each task's to its buffer and held-out window exactly as
routing would split them, without training on them, recording them in the ledger or
dead-lettering anything: they are not new, and the group's offsets are not moved. The loop
makes each task they name first (resumed from its newest published version). A consumer of no
group reads them, before the source joins its group.
"""

from __future__ import annotations

import logging

from kafka import KafkaConsumer, TopicPartition

from dynft.batching import LabelMap
from dynft.buffer import ReplayBuffer
from dynft.evaluation import HoldoutWindow, is_held_out
from dynft.events import Event, decode
from dynft.settings import Settings
from dynft.sources.kafka import client_config, parse_kafka_uri
from dynft.sources.kafka_unreadable import apply_read_fixes, partition_of

log = logging.getLogger(__name__)
POLL_MS = 500


def refill(
    events: list[Event], fraction: float, buffer: ReplayBuffer, holdout: HoldoutWindow, labels: LabelMap
) -> None:
    """Hand one task's ``events`` to its buffer and held-out window as routing would split them, untrained."""
    buffered = held = 0
    for event in events:
        if is_held_out(event.id, event.text, fraction):
            if labels.get(event.label) is not None:  # the gate scores only labels the head knows
                holdout.add(event)
                held += 1
        elif labels.get(event.label) is not None and buffer.add(event):
            buffered += 1
    log.info(
        "task %s: rebuilt the replay buffer (%d events) and the held-out window (%d) from %d events before "
        "the committed offsets, none trained on as new",
        events[0].task_name if events else "-",
        buffered,
        held,
        len(events),
    )


def read_before_committed(settings: Settings, only: frozenset[int] | None = None) -> list[Event]:
    """Per partition (of ``only``, when sharded), up to ``buffer.max_events`` well-formed events just
    before the group's committed offset."""
    apply_read_fixes()  # a header name that is not UTF-8 would stop the read here too
    k = settings.kafka
    servers, names, group = parse_kafka_uri(settings.source.uri, k.group)
    consumer = KafkaConsumer(
        bootstrap_servers=servers,
        group_id=group,
        enable_auto_commit=False,
        isolation_level=k.isolation_level,
        **client_config(k),
    )
    try:
        parts = [
            TopicPartition(t, p)
            for t in names
            for p in sorted(consumer.partitions_for_topic(t) or ())
            if only is None or p in only
        ]
        if not parts:
            return []
        starts = consumer.beginning_offsets(parts)
        stops = {tp: consumer.committed(tp) or 0 for tp in parts}
        wanted = [tp for tp in parts if stops[tp] > starts[tp]]
        consumer.assign(wanted)  # assigned, not subscribed: the group's membership and offsets stay as they are
        for tp in wanted:
            consumer.seek(tp, max(starts[tp], stops[tp] - settings.buffer.max_events))
        out: list[Event] = []
        while any(consumer.position(tp) < stops[tp] for tp in wanted):
            try:
                batches = consumer.poll(timeout_ms=POLL_MS)
            except Exception as exc:  # a partition's unreadable records: a rebuild does with less
                _give_up_on(consumer, exc, stops)
                continue
            for tp, records in batches.items():
                for record in records:
                    decoded = decode(record.value or b"", settings.events) if record.offset < stops[tp] else None
                    if isinstance(decoded, Event):
                        out.append(decoded)
                if consumer.position(tp) >= stops[tp]:
                    consumer.pause(tp)
        return out
    finally:
        consumer.close(autocommit=False)


def _give_up_on(consumer: KafkaConsumer, exc: Exception, stops: dict[TopicPartition, int]) -> None:
    """Read no more of the partition whose records could not be read (``exc`` re-raised when it names none)."""
    tp = partition_of(exc)
    if tp is None or tp not in stops:
        raise exc
    log.warning("rebuilding the replay buffer without the rest of %s/%d: %s", tp.topic, tp.partition, exc)
    stops[tp] = -1  # records of it still in flight are not used
    consumer.pause(tp)
