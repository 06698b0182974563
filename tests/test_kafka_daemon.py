"""The daemon against a real Kafka broker: accounting, restarts, groups, slow steps, dead letters."""

from __future__ import annotations

import codecs
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from kafka import KafkaConsumer
from prometheus_client import CollectorRegistry

from dynft.cli import main
from dynft.devbroker import Broker
from dynft.loop import TrainingLoop
from dynft.settings import Settings

from helpers import keyword_events, write_jsonl
from kafka_helpers import (
    accounted,
    all_accounted,
    end_offsets,
    kafka_settings,
    ledger_of,
    new_topic,
    publish,
    stop,
    trainer_process,
    wait_until,
)

pytestmark = pytest.mark.slow
LABELS = ["alpha", "beta", "gamma"]
MALFORMED = [b"{not json", b'{"id": "m1", "text": "", "label": "alpha"}', b"\xff\xfe", b'{"id": "m2", "text": "x"}']


@pytest.fixture
def running_loop() -> Iterator[Callable[[Settings, CollectorRegistry], TrainingLoop]]:
    loops: list[tuple[TrainingLoop, threading.Thread]] = []

    def start(settings: Settings, metrics: CollectorRegistry) -> TrainingLoop:
        loop = TrainingLoop(settings, metrics)
        thread = threading.Thread(target=loop.run, daemon=True)
        thread.start()
        loops.append((loop, thread))
        return loop

    yield start
    for loop, thread in loops:
        loop.should_exit.set()
        thread.join(120)


def test_10000_events_from_3_partitions_are_all_accounted_for(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path, running_loop
) -> None:  # type: ignore[no-untyped-def]
    topic, group = new_topic(kafka_broker), "accounting"
    events = keyword_events(10_000, LABELS, seed=21)
    rows: list[object] = list(events)
    for i, bad in enumerate(MALFORMED):
        rows.insert(1000 * (i + 1), bad)
    publish(kafka_broker, topic, rows, tmp_path)
    metrics = CollectorRegistry()
    settings = kafka_settings(tiny_settings, kafka_broker, topic, group)
    running_loop(settings, metrics)

    def drained() -> bool:
        ends, committed = end_offsets(kafka_broker, topic, group)
        return committed == ends

    wait_until(drained, 300, "committed offsets to reach the log end")
    ledger = ledger_of(settings.state_dir)
    statuses = ledger.lookup(e["id"] for e in events)
    missing = [i for i, (status, _) in statuses.items() if status not in ("trained", "held_out")]
    assert missing == [], f"{len(missing)} events unaccounted for, e.g. {missing[:5]}"
    counts = ledger.counts()
    assert counts["dead_lettered"] == len(MALFORMED)
    assert counts["duplicates"] == 0
    wait_until(
        lambda: all(
            metrics.get_sample_value("dynft_kafka_lag", {"topic": topic, "partition": str(p)}) == 0 for p in range(3)
        ),
        30,
        "the lag gauge to read 0",
    )
    assert metrics.get_sample_value("dynft_kafka_records_total", {"topic": topic}) == len(rows)
    # No rebalance is needed here; one at the start is tolerated: kafka-python sometimes rejoins
    # right after its first join on a loaded machine (its metadata changed since it joined).
    assert (metrics.get_sample_value("dynft_kafka_rebalances_total") or 0) <= 1

    # The malformed records sit in the dead-letter topic with their reason and origin.
    dlq = KafkaConsumer(
        f"{topic}.dlq", bootstrap_servers=kafka_broker.bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5000
    )
    try:
        letters = list(dlq)
    finally:
        dlq.close()
    assert sorted(m.value for m in letters) == sorted(MALFORMED)
    for m in letters:
        headers = dict(m.headers)
        assert headers["dynft.reason"].decode() in ("malformed_json", "empty_text", "not_utf8", "missing_field")
        assert headers["dynft.source.topic"].decode() == topic
        assert int(headers["dynft.source.offset"]) >= 0 and headers["dynft.source.partition"].decode() in "012"


def test_sigterm_and_restart_resume_from_committed_offsets(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path
) -> None:
    topic = new_topic(kafka_broker)
    settings = kafka_settings(tiny_settings, kafka_broker, topic, "restart")
    first, second = keyword_events(3000, LABELS, seed=22), keyword_events(2000, LABELS, seed=23, prefix="s")
    ids = [e["id"] for e in first + second]
    publish(kafka_broker, topic, first, tmp_path)
    state = tmp_path / "state"
    proc = trainer_process(settings, state, tmp_path / "a.log")
    wait_until(
        lambda: (state / "ledger.db").exists() and ledger_of(state).counts()["trained"] > 800,
        360,
        "the first run to train",
    )
    assert stop(proc) == 0
    publish(kafka_broker, topic, second, tmp_path)
    proc = trainer_process(settings, state, tmp_path / "b.log")
    try:
        wait_until(
            all_accounted([state], ids),
            480,
            "every event to be accounted for",
        )
    finally:
        assert stop(proc) == 0
    result = accounted([state], ids)
    assert {s for s, _ in result.values()} <= {"trained", "held_out"}
    duplicates = sum(seen - 1 for _, seen in result.values())
    assert duplicates == 0, "a clean stop checkpoints and commits everything it took"
    assert "resumed from" in (tmp_path / "b.log").read_text()
    ends, committed = end_offsets(kafka_broker, topic, "restart")
    assert committed == ends


def test_two_daemons_split_the_partitions_and_one_takes_over(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path
) -> None:
    topic = new_topic(kafka_broker)
    settings = kafka_settings(tiny_settings, kafka_broker, topic, "pair")
    first, second = keyword_events(4000, LABELS, seed=24), keyword_events(2000, LABELS, seed=25, prefix="t")
    ids = [e["id"] for e in first + second]
    state_a, state_b = tmp_path / "a", tmp_path / "b"
    a = trainer_process(settings, state_a, tmp_path / "a.log")
    b = trainer_process(settings, state_b, tmp_path / "b.log")
    try:
        time.sleep(15)  # both join before data flows
        publish(kafka_broker, topic, first, tmp_path)
        wait_until(
            all_accounted([state_a, state_b], [e["id"] for e in first]),
            480,
            "the pair to consume the first batch",
        )
        share_a, share_b = (ledger_of(s).counts()["trained"] for s in (state_a, state_b))
        assert share_a > 0 and share_b > 0, f"the partitions were not split: {share_a} / {share_b}"
        assert stop(a) == 0
        publish(kafka_broker, topic, second, tmp_path)
        wait_until(
            all_accounted([state_a, state_b], ids),
            480,
            "the survivor to consume everything",
        )
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                assert stop(proc) == 0
    result = accounted([state_a, state_b], ids)
    # Published at once to members that had caught up, each batch is a burst that a member may
    # not drain within trainer.freshest_first_after_s: then it trains the newest first and the
    # older events go to its replay buffer (buffered: accounted for, not lost; dynft.behind).
    assert {s for s, _ in result.values()} <= {"trained", "held_out", "buffered"}
    assert all(result[e["id"]][1] >= 1 for e in second)
    assert "partitions assigned" in (tmp_path / "b.log").read_text()


def test_a_step_slower_than_max_poll_interval_keeps_the_group_membership(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path, running_loop
) -> None:  # type: ignore[no-untyped-def]
    """A slow step is injected (a real slow GPU step cannot be produced here): the intake keeps
    polling, pauses the partitions when its queue fills, and the group never rebalances."""
    topic, group = new_topic(kafka_broker), "slow"
    events = keyword_events(1500, LABELS, seed=26)
    publish(kafka_broker, topic, events, tmp_path)
    settings = kafka_settings(tiny_settings, kafka_broker, topic, group)
    settings.kafka.max_poll_interval_ms = 3000
    settings.kafka.session_timeout_ms = 6000
    settings.kafka.max_poll_records = 100
    settings.source.queue_size = 64
    metrics = CollectorRegistry()
    loop = running_loop(settings, metrics)
    wait_until(lambda: loop.started.is_set(), 120, "the loop to start")
    # Past the first join (see the accounting test) before the step slows down.
    wait_until(
        lambda: (metrics.get_sample_value("dynft_events_total", {"outcome": "trained"}) or 0) >= 150, 120, "training"
    )
    real_step, slow_steps, before = loop.trainer.step, [0], [0.0]

    def slow_step(batch):  # type: ignore[no-untyped-def]
        if slow_steps[0] < 2:
            if slow_steps[0] == 0:  # rebalances from here on would be the slow step's fault
                before[0] = metrics.get_sample_value("dynft_kafka_rebalances_total") or 0
            slow_steps[0] += 1
            time.sleep(4.5)  # 1.5 x max_poll_interval_ms
        return real_step(batch)

    loop.trainer.step = slow_step  # type: ignore[method-assign]
    wait_until(
        lambda: end_offsets(kafka_broker, topic, group)[1] == end_offsets(kafka_broker, topic, group)[0],
        480,
        "everything to be consumed",
    )
    assert slow_steps[0] == 2
    assert metrics.get_sample_value("dynft_kafka_rebalances_total") == before[0]
    statuses = ledger_of(settings.state_dir).lookup(e["id"] for e in events)
    assert {s for s, _ in statuses.values()} <= {"trained", "held_out"}


def test_produce_keys_records_so_a_label_lands_on_one_partition(kafka_broker: Broker, tmp_path: Path) -> None:
    topic = f"keyed-{uuid.uuid4().hex[:8]}"
    path = write_jsonl(tmp_path / "in.jsonl", keyword_events(300, LABELS, seed=27))
    result = CliRunner().invoke(
        main,
        [
            "produce",
            str(path),
            "--topic",
            topic,
            "--bootstrap",
            kafka_broker.bootstrap,
            "--partitions",
            "3",
            "--key",
            "label",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "produced 300 records" in result.output
    consumer = KafkaConsumer(
        topic, bootstrap_servers=kafka_broker.bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5000
    )
    partitions: dict[str, set[int]] = {}
    try:
        for m in consumer:
            partitions.setdefault(json.loads(m.value)["label"], set()).add(m.partition)
    finally:
        consumer.close()
    assert set(partitions) == set(LABELS) and all(len(p) == 1 for p in partitions.values())


def test_compressed_batches_of_every_codec_train_and_aborted_transactions_never_do(
    kafka_broker: Broker, tiny_settings: Settings, tmp_path: Path, running_loop
) -> None:  # type: ignore[no-untyped-def]
    """Found by a review: an lz4 or zstd batch (any producer may compress) stopped the consumer
    with UnsupportedCodecError, restarting the trainer for ever; and records of an aborted
    transaction were trained and served (kafka-python reads uncommitted by default)."""
    from kafka import KafkaProducer

    topic, group = new_topic(kafka_broker, partitions=1), "codecs"
    kept: list[str] = []
    for codec in ("gzip", "snappy", "lz4", "zstd"):
        producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, compression_type=codec, linger_ms=50)
        for event in keyword_events(40, LABELS, seed=31, prefix=codec):
            producer.send(topic, json.dumps(event).encode())
            kept.append(event["id"])
        producer.flush()
        producer.close()
    transactional = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, transactional_id=f"tx-{topic}")
    transactional.init_transactions()
    aborted = [{**e, "label": "poison"} for e in keyword_events(20, LABELS, seed=32, prefix="aborted")]
    transactional.begin_transaction()
    for event in aborted:
        transactional.send(topic, json.dumps(event).encode())
    transactional.flush()  # on the broker, then aborted: unflushed records would never be written at all
    transactional.abort_transaction()
    transactional.begin_transaction()
    committed = keyword_events(20, LABELS, seed=33, prefix="committed")
    for event in committed:
        transactional.send(topic, json.dumps(event).encode())
    transactional.commit_transaction()
    transactional.close()
    kept += [e["id"] for e in committed]

    settings = kafka_settings(tiny_settings, kafka_broker, topic, group)
    loop = running_loop(settings, CollectorRegistry())
    wait_until(all_accounted([settings.state_dir], kept), 300, "every committed event to be accounted for")
    statuses = ledger_of(settings.state_dir).lookup(e["id"] for e in aborted)
    assert {status for status, _ in statuses.values()} == {"unseen"}, "an aborted record was read"
    assert "poison" not in loop.trainer.label_map.labels


def test_produce_names_a_record_it_could_not_send_and_sends_the_rest(kafka_broker: Broker, tmp_path: Path) -> None:
    """Found by a review: a 5 MB line ended `dynft produce` in a traceback, the lines after it unsent."""
    topic = f"big-{uuid.uuid4().hex[:8]}"
    rows: list[object] = [*keyword_events(3, LABELS, seed=28), {"id": "big", "text": "x" * (5 << 20), "label": "alpha"}]
    rows += keyword_events(3, LABELS, seed=29, prefix="after")
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    result = CliRunner().invoke(main, ["produce", str(path), "--topic", topic, "--bootstrap", kafka_broker.bootstrap])
    assert result.exit_code == 1, result.output
    assert "1 record(s) not produced" in result.output and "line 4: MessageSizeTooLargeError" in result.output
    assert "Traceback" not in result.output
    consumer = KafkaConsumer(
        topic, bootstrap_servers=kafka_broker.bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5000
    )
    try:
        ids = sorted(json.loads(m.value)["id"] for m in consumer)
    finally:
        consumer.close()
    assert ids == sorted(r["id"] for r in rows if isinstance(r, dict) and r["id"] != "big")  # type: ignore[index]


def test_produce_sends_a_file_with_a_byte_order_mark_and_a_lone_surrogate_key(
    kafka_broker: Broker, tmp_path: Path
) -> None:
    """Found by a probe: a file beginning with a UTF-8 byte order mark had its first record sent
    with it (dead-lettered as malformed JSON, while the file source reads the same line), and a
    ``\\ud800`` escape in the key field ended `dynft produce` in a traceback, the rest unsent."""
    topic = f"bom-{uuid.uuid4().hex[:8]}"
    rows = keyword_events(4, LABELS, seed=30)
    path = tmp_path / "in.jsonl"
    lines = [json.dumps(r).encode() for r in rows]
    lines.insert(2, b'{"id": "surrogate", "text": "w1 alpha1", "label": "alpha\\ud800"}')
    path.write_bytes(codecs.BOM_UTF8 + b"\n".join(lines) + b"\n")
    args = ["produce", str(path), "--topic", topic, "--bootstrap", kafka_broker.bootstrap, "--key", "label"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "produced 5 records" in result.output
    consumer = KafkaConsumer(
        topic, bootstrap_servers=kafka_broker.bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5000
    )
    try:
        got = {json.loads(m.value)["id"]: m.key for m in consumer}
    finally:
        consumer.close()
    assert set(got) == {r["id"] for r in rows} | {"surrogate"}
    assert got["surrogate"] == b"alpha\\ud800" and got[rows[0]["id"]] == rows[0]["label"].encode()
