"""The Kafka dead-letter sink: rejected records go to ``<topic><suffix>``, delivered or not committed.

Each dead letter is the original bytes with the original key and headers (trace ids and the
like stay with the record), then the headers ``dynft.reason``, ``dynft.detail``,
``dynft.source.topic``, ``dynft.source.partition`` and ``dynft.source.offset``. An original
header named ``dynft.*`` (a letter sent back to its topic by hand and rejected again) is left
out: the letter's own say why it is here now, and a consumer reading a header by name must not
find two. One larger than the producer's request limit
(``kafka.dlq_max_request_bytes``) cannot be sent whole: it goes out as its first bytes, with
``dynft.truncated`` set to ``sha256=<hex> size=<bytes>`` of the original.

Delivery is checked at ``flush`` (the training loop flushes before each checkpoint): a dead
letter the brokers did not take (down, or a retriable error) is kept, sent again at the next
flush, and makes ``flush`` raise ``DeadLetterError`` until it is delivered. The checkpoint that
would commit its position then fails and training goes on; nothing is lost, because an
uncommitted record is read (and rejected) again after a restart. A letter the brokers refuse
for good (too large for the topic's ``max.message.bytes``, say) would block every checkpoint
for ever: it is sent again as a stub (no value, none of the record's own headers, its key only
if small; ``dynft.truncated`` gives the original's hash and size), and a stub refused too goes
to the local ``fallback`` sink (the state directory's ``dead-letter.jsonl``), with an error in
the log. A refusal can also come before sending (a record whose key or headers alone pass the
producer's request limit): it is treated alike.

Brokers that do not answer at startup are waited for like any broker call: the topic and the
producer are set up at the first write or flush that finds the brokers answering. A broker
that answers and refuses (credentials, certificate, not authorised to create the topic) is a
``KafkaRefusedError``, a configuration error.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dynft.errors import BrokersUnavailableError, DeadLetterError
from dynft.events import Rejection
from dynft.settings import KafkaSettings
from dynft.sources.base import Record
from dynft.sources.kafka_connect import client_config, is_refusal, probe, refused

if TYPE_CHECKING:
    from dynft.deadletter import DeadLetterSink

log = logging.getLogger(__name__)
HEADROOM = 1024  # bytes of the request limit kept for the batch and record framing
PREFIX_MAX = 64 << 10  # at most this much of a too-large dead letter is kept
STUB_KEY_MAX = 1024  # a stub keeps the record's key up to this size
HEADER_PREFIX = "dynft."  # the letters' own headers; an original header of that name is left out
SETUP_RETRY_S = 5.0  # while the brokers do not answer, setting up is tried again after this


@dataclass
class _Letter:
    topic: str
    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]]
    future: Any = None  # kafka-python's FutureRecordMetadata once handed to the producer
    refused: BaseException | None = None  # why the producer refused it at once, for good (no future then)
    original: tuple[Rejection, Record] | None = None  # for a stub, and the local fallback
    stub: bool = False  # the value was left out after the brokers refused the letter for good


def _truncated(value: bytes) -> bytes:
    """The ``dynft.truncated`` header of a letter sent without (all of) ``value``."""
    return f"sha256={hashlib.sha256(value).hexdigest()} size={len(value)}".encode()


class KafkaDeadLetterSink:
    """Produces rejected records to ``<topic><suffix>``, creating that topic if it is missing.

    ``write`` runs on the batching thread, ``flush`` and ``close`` on the main thread; the
    letters not yet known to be delivered are shared between them under ``_lock``.
    """

    def __init__(
        self, servers: list[str], topics: list[str], settings: KafkaSettings, fallback: DeadLetterSink | None = None
    ) -> None:
        self.servers = servers
        self.topics = topics
        self.where = ", ".join(f"Kafka topic {t}{settings.dlq_suffix}" for t in topics)
        self.settings = settings
        self.fallback = fallback  # where letters the brokers refuse for good go
        self._fell_back = False  # the fallback took a letter: flushed with every flush from then on
        self._producer: Any = None
        self._letters: list[_Letter] = []  # written, not yet known to be delivered
        self._lock = threading.Lock()
        self._setup_at = 0.0  # the next try to set up, while the brokers do not answer
        try:
            self._setup()
        except BrokersUnavailableError as exc:
            log.warning("dead-letter topics: %s; set up once the brokers answer", exc)

    def _setup(self) -> None:
        """Create the dead-letter topics and the producer; raises while the brokers do not answer."""
        from kafka import KafkaAdminClient, KafkaProducer
        from kafka.errors import KafkaError, for_code

        self._setup_at = time.monotonic() + SETUP_RETRY_S
        config = client_config(self.settings)
        probe(self.servers, config)
        try:
            admin = KafkaAdminClient(bootstrap_servers=self.servers, **config)
            try:
                suffix = self.settings.dlq_suffix
                wanted = {f"{t}{suffix}": {"num_partitions": 1, "replication_factor": -1} for t in self.topics}
                result = admin.create_topics(wanted, raise_errors=False)
            finally:
                admin.close()
            for topic in result.get("topics", []):
                error = for_code(topic.get("error_code", 0))
                if is_refusal(error()):  # not authorised: a configuration to fix, not an outage
                    raise refused(f"creating dead-letter topic {topic.get('name')}", error())
            self._producer = KafkaProducer(
                bootstrap_servers=self.servers,
                acks="all",
                linger_ms=5,
                max_request_size=self.settings.dlq_max_request_bytes,
                max_block_ms=5_000,  # a send never holds the batching thread long: flush checks delivery
                **config,
            )
        except KafkaError as exc:
            if is_refusal(exc):
                raise refused("dead-letter topics", exc) from exc
            raise BrokersUnavailableError(f"dead-letter topics on {','.join(self.servers)}: {exc}") from exc

    def write(self, rejection: Rejection, record: Record) -> None:
        topic, _, partition = record.stream.rpartition("/")
        # A null header value goes out empty, as kafka-python's producer would write it anyway.
        own = [(k, v or b"") for k, v in record.headers or [] if not k.startswith(HEADER_PREFIX)]
        headers = [
            *own,
            ("dynft.reason", rejection.reason.encode()),
            ("dynft.detail", rejection.detail.encode()),
            ("dynft.source.topic", topic.encode()),
            ("dynft.source.partition", partition.encode()),
            ("dynft.source.offset", str(record.next - 1).encode()),
        ]
        letter = self._fitted(_Letter(f"{topic}{self.settings.dlq_suffix}", rejection.raw, record.key, headers))
        letter.original = (rejection, record)
        with self._lock:
            self._letters.append(letter)
            self._send([letter])

    def _fitted(self, letter: _Letter) -> _Letter:
        """The letter itself, or its first bytes with the original's hash and size when it is too large."""
        overhead = HEADROOM + len(letter.key or b"") + sum(len(k) + len(v) for k, v in letter.headers)
        room = self.settings.dlq_max_request_bytes - overhead
        if len(letter.value) <= room:
            return letter
        note = _truncated(letter.value)
        prefix = letter.value[: max(0, min(PREFIX_MAX, room - len(note) - 32))]
        headers = [*letter.headers, ("dynft.truncated", note)]
        return _Letter(letter.topic, prefix, letter.key, headers, original=letter.original)

    def _refused_for_good(self, failed: list[tuple[_Letter, BaseException | None]]) -> tuple[list[_Letter], set[int]]:
        """The letters to send again: those the brokers refused for a reason a retry cannot cure
        become stubs, and a refused stub goes to the local fallback; and the ids of those (delivered)."""
        from kafka.errors import KafkaError

        kept, settled = [], set()
        for letter, error in failed:
            final = isinstance(error, KafkaError) and not error.retriable
            if not final or letter.original is None:
                kept.append(letter)
            elif not letter.stub:
                # Only the letter's own headers, and the key only if it is small: either may be
                # what the brokers refused (a record's key or headers over the request limit).
                note = _truncated(letter.original[0].raw)
                own = [(k, v) for k, v in letter.headers if k.startswith(HEADER_PREFIX) and k != "dynft.truncated"]
                key = letter.key if letter.key is None or len(letter.key) <= STUB_KEY_MAX else None
                log.warning("dead letter for %s refused (%s): sending a stub without its value", letter.topic, error)
                headers = [*own, ("dynft.truncated", note)]
                kept.append(_Letter(letter.topic, b"", key, headers, original=letter.original, stub=True))
            elif self.fallback is not None:
                log.error("dead letter for %s refused even as a stub (%s): kept locally instead", letter.topic, error)
                self.fallback.write(*letter.original)  # made durable at the end of this flush
                self._fell_back = True
                settled.add(id(letter))
            else:
                kept.append(letter)
        return kept, settled

    def _send(self, letters: list[_Letter]) -> None:
        """Hand letters to the producer (setting it up if due); a failure leaves them for the next flush."""
        from kafka.errors import KafkaError

        if self._producer is None:
            if time.monotonic() < self._setup_at:
                return
            try:
                self._setup()
            except BrokersUnavailableError as exc:
                log.warning("dead letters wait for the brokers: %s", exc)
                return
        for letter in letters:
            try:
                letter.future = self._producer.send(
                    letter.topic, value=letter.value, key=letter.key, headers=letter.headers
                )
            except KafkaError as exc:  # no metadata within max_block_ms: the brokers went away, or
                # a refusal no retry cures, made before sending (a key and headers over the request
                # limit): that one becomes a stub at the next flush, not a letter retried for ever.
                letter.future, letter.refused = None, None if exc.retriable else exc
                log.warning("dead letter for %s not sent yet: %s", letter.topic, exc)

    def flush(self) -> None:
        """Wait for every dead letter; raises ``DeadLetterError`` while any is undelivered."""
        with self._lock:
            self._send([letter for letter in self._letters if letter.future is None])
            if self._producer is not None:
                try:
                    self._producer.flush(timeout=self.settings.dlq_flush_timeout_s)
                except Exception as exc:  # kafka-python's timeout: the futures below say which failed
                    log.warning("dead-letter flush: %s", exc)
            failed: list[tuple[_Letter, BaseException | None]] = []
            for letter in self._letters:
                future = letter.future
                if future is None:  # never sent: refused by our own producer before sending, or no broker
                    failed.append((letter, letter.refused))
                elif not future.is_done:  # still in flight after the flush's timeout
                    failed.append((letter, None))
                elif future.failed():
                    failed.append((letter, future.exception))
            self._letters, settled = self._refused_for_good(failed)
            for letter in self._letters:
                letter.future = None  # sent again at the next flush (or write)
            failed = [(letter, error) for letter, error in failed if id(letter) not in settled]
            if self._producer is not None and any(error is not None for _, error in failed):
                # kafka-python's idempotent producer can stay in a fatal state after one refused
                # batch, failing every later send: the next flush starts from a new producer.
                self._producer.close(timeout=5)
                self._producer, self._setup_at = None, 0.0
        if self.fallback is not None and self._fell_back:
            self.fallback.flush()  # raises DeadLetterError while the disk does not take them
        if failed:
            letter, error = failed[0]
            reason = f"{type(error).__name__}: {error}" if error is not None else "not sent: the brokers do not answer"
            raise DeadLetterError(f"{len(failed)} dead letter(s) not delivered, e.g. to {letter.topic} ({reason})")

    def close(self) -> None:
        try:
            self.flush()
        except DeadLetterError as exc:  # their positions were not committed: read and rejected again later
            log.error("closing the dead-letter producer: %s", exc)
        finally:  # a failed flush still releases the producer's sockets
            if self._producer is not None:
                self._producer.close()
            if self.fallback is not None:
                self.fallback.close()
