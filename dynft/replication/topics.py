"""The two compacted versions topics: created by dynft, checked at every start.

Both are compacted (only the newest record per key is kept, with no time limit) and take
records up to ``kafka.versions_max_message_bytes``; an existing topic that is not compacted
or takes smaller records is a configuration error naming the setting to fix.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from dynft.errors import BrokersUnavailableError, ConfigError, ReplicationError
from dynft.replication.records import pointer_topic
from dynft.settings import KafkaSettings
from dynft.sources.kafka import RECONNECT_FIRST_S, client_config
from dynft.sources.kafka_connect import probe
from dynft.sources.kafka_unreadable import apply_read_fixes

log = logging.getLogger(__name__)
MARGIN = 64 << 10  # room for the record header and batch framing above the largest value


def await_brokers(servers: list[str], settings: KafkaSettings, stop: threading.Event) -> bool:
    """Wait until a broker answers, as a trainer does (services start in any order); False when
    ``stop`` is set first. A broker that answers and refuses raises ``KafkaRefusedError``."""
    delay, since = RECONNECT_FIRST_S, None
    while not stop.is_set():
        try:
            probe(servers, client_config(settings))
        except BrokersUnavailableError as exc:
            if since is None:  # once, not once per try
                since = time.monotonic()
                log.warning("%s; waiting for the brokers (not ready meanwhile)", exc)
            stop.wait(delay)
            delay = min(delay * 2, settings.reconnect_max_s)
            continue
        if since is not None:
            log.warning("the brokers answer after %.0f s", time.monotonic() - since)
        return True
    return False


class BrokerWatch:
    """Whether the versions topics' brokers answer, looked at every ``interval_s`` on a thread of
    its own until ``stop`` is set (a probe of a host that drops packets waits its whole timeout:
    the follower's thread must not). kafka-python's consumer just returns nothing in an outage, so
    without it a replica would serve a version that may be stale without a word. Said once per
    outage, and in ``up``."""

    def __init__(
        self, servers: list[str], settings: KafkaSettings, up: Any, stop: threading.Event, interval_s: float = 5.0
    ) -> None:
        self.servers, self.settings, self.up, self.interval_s = servers, settings, up, interval_s
        self._stop = stop
        self._down_since: float | None = None
        self._refused = False
        self._thread = threading.Thread(target=self._run, name="dynft-broker-watch", daemon=True)
        up.set(1)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # a watch that died would leave `up` at its last value for good
                log.exception("checking the versions topics' brokers failed (tried again)")

    def check(self) -> None:
        now = time.monotonic()
        try:
            probe(self.servers, client_config(self.settings))
        except BrokersUnavailableError as exc:
            if self._down_since is None:
                self._down_since = now
                self.up.set(0)
                log.warning("%s: the version serving now may be stale until they answer", exc)
            return
        except ConfigError as exc:  # a broker that answers and refuses: not an outage, but no updates either
            if not self._refused:
                log.warning("the versions topics' brokers refuse this replica now: %s", exc)
            self._refused = True
            return
        self._refused = False
        if self._down_since is not None:
            log.warning("the versions topics' brokers answer again after %.0f s", now - self._down_since)
            self._down_since = None
            self.up.set(1)


def topic_configs(max_bytes: int) -> dict[str, str]:
    return {"cleanup.policy": "compact", "max.message.bytes": str(max_bytes), "retention.ms": "-1"}


def ensure_topics(
    servers: list[str], topic: str, settings: KafkaSettings, extra: dict[str, int] | None = None
) -> list[str]:
    """Create the versions and pointer topics (and ``extra`` ones alike, name -> partitions) if missing;
    check existing ones. Returns the ones created."""
    from kafka import KafkaAdminClient
    from kafka.admin import ConfigResource, ConfigResourceType
    from kafka.errors import KafkaError

    quiet_slow_task_warnings()  # before the first client: the admin client's loop warns too
    wanted = settings.versions_max_message_bytes
    partitions = {topic: 1, pointer_topic(topic): 1, **(extra or {})}
    names = list(partitions)
    try:
        admin = KafkaAdminClient(bootstrap_servers=servers, **client_config(settings))
        try:
            missing = [t for t in names if t not in admin.list_topics()]
            if missing:
                specs = {
                    t: {"num_partitions": partitions[t], "replication_factor": -1, "configs": topic_configs(wanted)}
                    for t in missing
                }
                admin.create_topics(specs, raise_errors=False, wait_for_metadata=True)
                log.info("created the compacted topic(s) %s", ", ".join(missing))
            resources = [ConfigResource(ConfigResourceType.TOPIC, t) for t in names]
            described = admin.describe_configs(resources, config_filter="all")
        finally:
            admin.close()
    except KafkaError as exc:
        raise ReplicationError(f"cannot create or check the versions topics on {','.join(servers)}: {exc}") from exc
    for name in names:
        check_topic(name, config_values(described, name), wanted)
    return missing


def config_values(described: Any, topic: str) -> dict[str, str]:
    """``{key: value}`` of one topic out of ``describe_configs``'s nested answer."""
    for by_name in (described or {}).values():
        if isinstance(by_name, dict) and topic in by_name:
            return {k: str(v.get("value") if isinstance(v, dict) else v) for k, v in by_name[topic].items()}
    raise ReplicationError(f"the broker did not describe topic {topic}")


def check_topic(topic: str, config: dict[str, str], wanted: int) -> None:
    if "compact" not in config.get("cleanup.policy", ""):
        raise ConfigError(
            f"topic {topic}: cleanup.policy is {config.get('cleanup.policy')!r}; a versions topic must be "
            "compacted (kafka-configs --alter --add-config cleanup.policy=compact)"
        )
    have = int(config.get("max.message.bytes", "0") or 0)
    if have < wanted:
        raise ConfigError(
            f"topic {topic}: max.message.bytes is {have}, below kafka.versions_max_message_bytes ({wanted}); "
            f"raise the topic's max.message.bytes or lower the setting"
        )


class _SlowTaskFilter(logging.Filter):
    """Drops kafka-python's "Task ... ran for 0.2s (>0.1s threshold)" warnings.

    Its network loop warns whenever one step takes over 0.1 s, which on a busy CPU, or while a
    multi-megabyte adapter record is decoded, happens on every other poll: noise in a replica's
    log, and nothing dynft can act on (the client has no setting for the threshold).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Task ") and " ran for " in message and "threshold" in message)


def quiet_slow_task_warnings() -> None:
    selector_log = logging.getLogger("kafka.net.selector")
    if not any(isinstance(f, _SlowTaskFilter) for f in selector_log.filters):
        selector_log.addFilter(_SlowTaskFilter())


def producer(servers: list[str], settings: KafkaSettings) -> Any:
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    quiet_slow_task_warnings()
    try:
        return KafkaProducer(
            bootstrap_servers=servers,
            acks="all",
            linger_ms=0,
            max_request_size=settings.versions_max_message_bytes + MARGIN,
            **client_config(settings),
        )
    except KafkaError as exc:
        raise ReplicationError(f"cannot reach the versions topics on {','.join(servers)}: {exc}") from exc


def consumer(servers: list[str], settings: KafkaSettings) -> Any:
    """A group-less consumer: every replica reads the whole of both topics itself."""
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    quiet_slow_task_warnings()
    apply_read_fixes()  # a poll after a corrupt batch would otherwise spin for ever
    try:
        return KafkaConsumer(
            bootstrap_servers=servers,
            group_id=None,
            enable_auto_commit=False,
            max_partition_fetch_bytes=settings.versions_max_message_bytes + MARGIN,
            fetch_max_bytes=max(settings.fetch_max_bytes, settings.versions_max_message_bytes + MARGIN),
            **client_config(settings),
        )
    except KafkaError as exc:
        raise ReplicationError(f"cannot reach the versions topics on {','.join(servers)}: {exc}") from exc
