"""What the term topic may hold that no trainer wrote, with the real broker."""

from __future__ import annotations

import uuid

from kafka import KafkaProducer

from dynft.devbroker import Broker
from dynft.election import Election
from dynft.replication import topics
from dynft.settings import Settings
from dynft.term import term_topic

from kafka_helpers import kafka_settings, new_topic, start_and_hold


def test_a_record_that_is_no_term_record_is_skipped_and_the_term_is_taken(
    kafka_broker: Broker, tiny_settings: Settings
) -> None:
    """It used to fail every take of a term for good (the compacted topic keeps it): no trainer
    ever trained, and the election logged a traceback a second."""
    settings = kafka_settings(tiny_settings, kafka_broker, new_topic(kafka_broker, 1), f"g-{uuid.uuid4().hex[:6]}")
    settings.kafka.versions_topic = versions = f"versions-{uuid.uuid4().hex[:8]}"
    settings.kafka.session_timeout_ms = 6000
    k = settings.kafka
    topics.ensure_topics([kafka_broker.bootstrap], versions, k, extra={term_topic(versions): 1})
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all")
    bad = [b"{not json", b'{"epoch": "seven"}', b'{"holder": "x"}', b'{"epoch": 1e999}', b"[" * 100_000]
    # Found by a probe: the next trainer took epoch 2^53 from it, and replicas refused its every record.
    bad.append(b'{"epoch": 9007199254740991, "holder": "evil:1"}')
    for i, value in enumerate([*bad, b'{"epoch": 4, "holder": "old:1"}']):
        producer.send(term_topic(versions), key=b"k%d" % i, value=value).get(30)  # keys apart: none compacted away
    producer.close()
    election = Election(settings, "host:1")
    try:
        start_and_hold(election)
        assert election.epoch == 5  # above the one readable term record
    finally:
        election.close()
