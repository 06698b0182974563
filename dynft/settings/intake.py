"""The intake side's sections: the source, Kafka, the limits on events, and the durable state
(checkpoint and ledger) whose commits move the source's positions.

Split from ``dynft.settings.sections`` (the learning and serving side), whose ``Section`` base
they share; ``dynft.settings.Settings`` nests them all.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from dynft.settings.sections import Section

_TOPIC = re.compile(r"[A-Za-z0-9._-]+")  # Kafka's own characters for topic names
MAX_VERSIONS_TOPIC = 249 - len(".pointer")  # Kafka's 249, less the longest suffix dynft adds


def versions_topic_problem(name: str) -> str | None:
    """Why ``name`` cannot be a versions topic, or None. Checked before anything starts: the broker
    refuses a bad name only once a trainer or replica runs, an exit 1 that a supervisor restarts."""
    if not _TOPIC.fullmatch(name) or name in (".", ".."):
        return f"{name[:64]!r} is not a Kafka topic name (the characters A-Z a-z 0-9 . _ -)"
    if len(name) > MAX_VERSIONS_TOPIC:
        return f"a versions topic's name has at most {MAX_VERSIONS_TOPIC} characters (its pointer topic adds .pointer)"
    return None


class SourceSettings(Section):
    """Where labeled events come from (see ``dynft.sources``)."""

    uri: str = Field("demo", description="demo, file:PATH, file:- (stdin), or kafka://HOST:PORT/TOPIC[,TOPIC]?group=G")
    follow: bool = Field(False, description="file sources: read appended lines, follow rotation (tail -F)")
    poll_interval_s: float = Field(0.2, gt=0, description="follow mode: how often to look for new data")
    queue_size: int = Field(8192, ge=1, description="bound of the intake queue between source and trainer")
    queue_max_bytes: int = Field(
        64 << 20, ge=1024, description="bound of the intake queue in raw bytes (a record larger alone still passes)"
    )
    demo_rate: float = Field(0.0, ge=0, description="demo: events per second, 0 = as fast as the trainer takes them")
    demo_loop: bool = Field(True, description="demo: start the drift schedule again after its last phase")
    demo_seed: int = Field(0, description="demo: seed of the shuffles in the drift schedule")
    exit_at_end: bool = Field(False, description="finite sources: stop the trainer after the last event")
    dead_letter_path: Path | None = Field(
        None, description="JSONL file for rejected events; default <state_dir>/dead-letter.jsonl"
    )
    dead_letter_max_bytes: int = Field(
        64 << 20,
        ge=4096,
        description="the dead-letter file is rotated (to .1, .2, ...) before it would grow past this",
    )
    dead_letter_max_files: int = Field(
        4, ge=1, description="rotated dead-letter files kept besides the current one; the oldest is deleted"
    )


class KafkaSettings(Section):
    """The Kafka source and dead-letter topic (see ``dynft.sources.kafka``); kafka-python's names."""

    client_id: str = Field("dynft", description="client id shown in broker logs and quotas")
    group: str = Field("dynft", description="consumer group when the URI names none")
    auto_offset_reset: Literal["earliest", "latest"] = Field("earliest", description="where a new group starts")
    isolation_level: Literal["read_committed", "read_uncommitted"] = Field(
        "read_committed",
        description="read_committed: records of aborted (or still open) producer transactions are never trained on",
    )
    max_poll_records: int = Field(2000, ge=1, description="records per poll")
    max_poll_interval_ms: int = Field(300_000, ge=1000, description="longest gap between polls before a rebalance")
    session_timeout_ms: int = Field(10_000, ge=1000, description="heartbeat session timeout")
    group_instance_id: str | None = Field(
        None,
        min_length=1,
        description="static membership: a restarted daemon with the same id takes its partitions back at once",
    )
    fetch_max_bytes: int = Field(50 << 20, ge=1024, description="bytes per fetch response")
    max_partition_fetch_bytes: int = Field(1 << 20, ge=1024, description="bytes per partition per fetch")
    consumer_process: bool = Field(
        True, description="poll in a child process: the client's record parsing uses another core than training"
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="SASL_SSL for SASL over TLS; SASL credentials without SASL_ are ignored (warned)"
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = Field(
        None, description="PLAIN (only over TLS: warned otherwise) or SCRAM-*; OAUTHBEARER is not supported"
    )
    sasl_username: str | None = Field(None, description="SASL user (PLAIN and SCRAM)")
    sasl_password: SecretStr | None = Field(None, description="SASL password (secret: masked in output)")
    ssl_cafile: Path | None = Field(None, description="PEM CA certificates that sign the brokers' certificates")
    ssl_certfile: Path | None = Field(None, description="PEM client certificate, for brokers that require one")
    ssl_keyfile: Path | None = Field(None, description="PEM private key of the client certificate")
    ssl_password: SecretStr | None = Field(
        None, description="password of an encrypted ssl_keyfile (secret: masked in output)"
    )
    ssl_check_hostname: bool = Field(True, description="the broker's certificate must name the host connected to")
    dlq_suffix: str = Field(".dlq", min_length=1, description="dead letters go to <topic><suffix>")
    dlq_max_request_bytes: int = Field(
        1 << 20,
        ge=4096,
        description="dead-letter producer's request limit; a larger dead letter is sent as its sha256, size "
        "and first bytes",
    )
    dlq_flush_timeout_s: float = Field(
        30.0, gt=0, description="longest wait for dead letters at a checkpoint; undelivered ones keep it uncommitted"
    )
    reconnect_max_s: float = Field(
        10.0, gt=0, description="brokers that do not answer are tried again after 0.5 s, doubling up to this"
    )
    lag_interval_s: float = Field(5.0, gt=0, description="how often consumer lag is measured")
    versions_topic: str | None = Field(
        None, min_length=1, description="compacted topic of published versions (pointer: <topic>.pointer); off if unset"
    )
    versions_bootstrap: str | None = Field(
        None, description="HOST:PORT[,HOST:PORT] of the versions topics; default: the Kafka source's brokers"
    )
    versions_max_message_bytes: int = Field(
        16 << 20, ge=1 << 20, description="largest version record (max.message.bytes of the versions topics)"
    )
    election: bool = Field(
        False,
        description="trainers of one group elect one active trainer through Kafka (group <group>.leader on "
        "<versions_topic>.term); the others stand by. Needs versions_topic and a kafka:// source",
    )
    sharded: bool = Field(
        False,
        description="with election: trainers split the source topic's partitions (one term per partition, on "
        "<versions_topic>.shards) and train the tasks keyed to them; events must be keyed by task",
    )

    @field_validator("versions_topic")
    @classmethod
    def _versions_topic_name(cls, v: str | None) -> str | None:
        problem = None if v is None else versions_topic_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _sharded_needs_election(self) -> KafkaSettings:
        if self.sharded and not self.election:
            raise ValueError("kafka.sharded needs kafka.election = true: each shard's trainer is elected")
        return self

    @field_validator("sasl_mechanism")
    @classmethod
    def _no_oauthbearer(cls, v: str | None) -> str | None:
        if v == "OAUTHBEARER":
            raise ValueError(
                "OAUTHBEARER needs a token provider, which dynft does not wire; "
                "use PLAIN (over SASL_SSL) or SCRAM-SHA-512"
            )
        return v


class CheckpointSettings(Section):
    """Durable trainer state (see ``dynft.checkpoint``); source offsets are committed after each."""

    every_steps: int = Field(200, ge=1, description="checkpoint after this many steps...")
    interval_s: float = Field(30.0, gt=0, description="...or this many seconds, whichever comes first")
    keep: int = Field(2, ge=1, description="complete checkpoints kept")
    drift_history: int = Field(2000, ge=0, description="recent error/loss values kept to rebuild the detectors")
    disk_full_retry_max_s: float = Field(
        30.0,
        gt=0,
        description="while the state disk is full, intake pauses and writes are retried after 1 s, "
        "the delay doubling up to this",
    )


class LedgerSettings(Section):
    """Retention of the event ledger (see ``dynft.ledger``); pruned in the background."""

    retention_days: float = Field(
        30.0, ge=0, description="outcomes not seen for this long are pruned; 0 = kept until max_rows"
    )
    max_rows: int = Field(
        10_000_000, ge=0, description="most event ids kept (about 1 GB); the least recently seen go first; 0 = no cap"
    )
    prune_interval_s: float = Field(300.0, gt=0, description="how often the background pruner runs")
    max_pending_rows: int = Field(
        100_000, ge=1, description="outcomes held in memory while commits fail; at this bound intake pauses"
    )


class EventSettings(Section):
    """Limits applied to every incoming event (see ``dynft.events``)."""

    max_text_chars: int = Field(8192, ge=1, description="longer texts are rejected, never cut")
    max_label_chars: int = Field(128, ge=1, description="longer labels are rejected")
    max_id_chars: int = Field(256, ge=1, description="longer event ids are rejected")
    max_record_bytes: int = Field(1 << 20, ge=64, description="raw records larger than this are rejected unparsed")
    max_weight: float = Field(
        1000.0,
        gt=0,
        allow_inf_nan=False,
        description="events weighted above this are rejected (invalid_weight), so one cannot outweigh a whole batch",
    )
