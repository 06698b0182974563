"""Prometheus metrics, created per process in an object that takes its ``CollectorRegistry``.

Nothing is registered at import time, so tests give each component a fresh registry. Under
``dynft run`` the trainer and server processes write to a shared multiprocess directory and
the server's ``/metrics`` exposes both (prometheus_client's multiprocess mode); every gauge
here has a single writer, so they use the ``livemostrecent`` mode.
"""

from __future__ import annotations

import os
from pathlib import Path

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client import multiprocess as mp

MP_ENV = "PROMETHEUS_MULTIPROC_DIR"
FAST = (1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.5, 1.0)
LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FRESHNESS = (0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 20.0, 30.0, 60.0, 120.0, 300.0)
STEP = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def enable_multiprocess(directory: Path) -> None:
    """Make metrics created from now on in this process write to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    os.environ[MP_ENV] = str(directory)
    # prometheus_client picks its value class when first imported; pick again now.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def multiprocess_dir() -> Path | None:
    value = os.environ.get(MP_ENV)
    return Path(value) if value else None


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The text exposition of this process's metrics, or of every process in multiprocess mode."""
    directory = multiprocess_dir()
    if directory is not None:
        registry = CollectorRegistry()
        mp.MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return prometheus_client.generate_latest(registry), prometheus_client.CONTENT_TYPE_LATEST


def mark_dead(pid: int) -> None:
    """Drop a dead process's live gauges (multiprocess mode only)."""
    directory = multiprocess_dir()
    if directory is not None:
        mp.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


def _gauge(name: str, doc: str, registry: CollectorRegistry, labels: tuple[str, ...] = ()) -> Gauge:
    return Gauge(name, doc, labels, registry=registry, multiprocess_mode="livemostrecent")


class TrainerMetrics:
    """What the training loop reports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.events = Counter(
            "dynft_events", "Events by outcome (trained, held_out, dead_lettered)", ["outcome"], registry=r
        )
        self.rejected = Counter("dynft_events_rejected", "Events dead-lettered, by reason", ["reason"], registry=r)
        self.intake_queue = _gauge("dynft_intake_queue_events", "Records waiting between source and trainer", r)
        self.term_partitions = _gauge(  # kafka.election: 0 on a standby; 1 on the active one; N sharded
            "dynft_trainer_term_partitions", "Partitions this trainer's election term holds (0: standing by)", r
        )
        self.term_epoch = _gauge("dynft_trainer_term_epoch", "Epoch of this trainer's election term (0: none)", r)
        self.intake_queue_bytes = _gauge("dynft_intake_queue_bytes", "Raw bytes waiting between source and trainer", r)
        self.intake_paused = _gauge(
            "dynft_intake_paused", "1 while intake is paused because the state disk refuses writes or outcomes wait", r
        )
        self.disk_free = _gauge("dynft_state_disk_free_bytes", "Free bytes on the state directory's file system", r)
        self.buffer_events = _gauge("dynft_buffer_events", "Events in the replay buffer", r)
        self.buffer_bytes = _gauge("dynft_buffer_bytes", "Approximate bytes held by the replay buffer", r)
        self.labels = _gauge("dynft_labels", "Labels known to the trainer", r)
        self.train_steps = Counter("dynft_train_steps", "Training steps applied", registry=r)
        self.train_skipped = Counter(
            "dynft_train_steps_skipped", "Training steps skipped, by reason", ["reason"], registry=r
        )
        self.train_samples = Counter("dynft_train_samples", "Rows trained on, fresh and replayed", registry=r)
        self.step_seconds = Histogram(
            "dynft_train_step_seconds", "Duration of a training step", registry=r, buckets=STEP
        )
        self.loss = _gauge("dynft_train_loss", "Loss of the last training step", r)
        self.lr = _gauge("dynft_train_learning_rate", "Learning rate of the adapter weights", r)
        self.accuracy = _gauge("dynft_prequential_accuracy", "Rolling test-then-train accuracy", r)
        self.macro_f1 = _gauge("dynft_prequential_macro_f1", "Rolling test-then-train macro-F1", r)
        self.preq_loss = _gauge("dynft_prequential_loss", "Rolling test-then-train loss", r)
        self.majority = _gauge("dynft_prequential_majority_rate", "Share of the most frequent label in the window", r)
        self.drift = Counter("dynft_drift_detections", "Drift detections", ["detector", "stream"], registry=r)
        self.reactions = Counter("dynft_drift_reactions", "Reactions to drift", ["reaction"], registry=r)
        self.versions = Counter(
            "dynft_adapter_versions", "Published versions by gate decision", ["decision"], registry=r
        )
        self.publish_errors = Counter("dynft_publish_errors", "Versions that could not be published", registry=r)
        self.gate_accuracy = _gauge("dynft_gate_accuracy", "Held-out accuracy at the last gate", r, ("adapter",))
        self.latest_version = _gauge("dynft_latest_version", "Newest published adapter version", r)
        self.checkpoints = Counter("dynft_checkpoints", "Checkpoints written", registry=r)
        self.checkpoint_errors = Counter("dynft_checkpoint_errors", "Checkpoints that could not be written", registry=r)
        # Per task (dynft.tasks); task names are admitted up to tasks.max_tasks, which bounds the series.
        t = ("task",)
        self.task_accuracy = _gauge(
            "dynft_task_prequential_accuracy", "Rolling test-then-train accuracy per task", r, t
        )
        self.task_events = Counter("dynft_task_events_trained", "Fresh events trained per task", ["task"], registry=r)
        self.task_drift = Counter("dynft_task_drift_detections", "Drift detections per task", ["task"], registry=r)
        self.task_latest_version = _gauge("dynft_task_latest_version", "Newest published version per task", r, t)
        self.task_serving_version = _gauge("dynft_task_promoted_version", "Version the gate serves per task", r, t)
        self.task_versions = Counter(
            "dynft_task_adapter_versions",
            "Published versions per task and gate decision",
            ["task", "decision"],
            registry=r,
        )
        self.task_publish_errors = Counter(
            "dynft_task_publish_errors", "Versions that could not be published, per task", ["task"], registry=r
        )

    def declare(self, detectors: dict[str, str], reasons: tuple[str, ...], reactions: list[str]) -> None:
        """Create the known label values at 0, so dashboards see a series before its first event."""
        for outcome in ("trained", "held_out", "dead_lettered", "skipped"):
            self.events.labels(outcome)
        for reason in reasons:
            self.rejected.labels(reason)
        for reason in ("non_finite_loss", "non_finite_grad"):
            self.train_skipped.labels(reason)
        for stream, detector in detectors.items():
            self.drift.labels(detector, stream)
        for reaction in reactions:
            self.reactions.labels(reaction)
        for decision in ("promoted", "rejected"):
            self.versions.labels(decision)


class ServerMetrics:
    """What the inference server reports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.requests = Counter("dynft_requests", "HTTP requests by status code", ["status"], registry=r)
        self.connections_refused = Counter(  # past server.limit_concurrency: "503" or "closed" at once
            "dynft_connections_refused", "Connections refused past the connection limit, by how", ["how"], registry=r
        )
        for how in ("503", "closed"):  # a sample from the start: an alert on its rate needs one
            self.connections_refused.labels(how)
        self.predict_seconds = Histogram(
            "dynft_predict_seconds", "Predict request latency", registry=r, buckets=LATENCY
        )
        self.batch_size = Histogram(
            "dynft_predict_batch_texts", "Texts per micro-batch", registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128)
        )
        self.serving_version = _gauge("dynft_serving_version", "Adapter version the server answers with", r)
        self.task_serving_version = _gauge(
            "dynft_task_serving_version", "Adapter version the server answers with, per task", r, ("task",)
        )
        self.task_predict_seconds = Histogram(
            "dynft_task_predict_seconds", "Predict request latency per task", ["task"], registry=r, buckets=LATENCY
        )
        self.swaps = Counter("dynft_swaps", "Adapter versions swapped in", registry=r)
        self.fast_path_answers = Counter(
            "dynft_fast_path_answers",
            "Texts answered with prototype rows for labels the serving version lacks (the fast path)",
            registry=r,
        )
        self.freshness_seconds = Histogram(
            "dynft_freshness_seconds",
            "Event arrival at the trainer -> served by a version trained on it (arrived since the server started)",
            registry=r,
            buckets=FRESHNESS,
        )
        self.swap_seconds = Histogram(
            "dynft_swap_seconds", "Time to flip to a loaded version", registry=r, buckets=FAST
        )
        self.swap_load_seconds = Histogram(
            "dynft_swap_load_seconds",
            "Time to read, check and stage a version (off the request path)",
            registry=r,
            buckets=LATENCY,
        )
        self.swap_failures = Counter(
            "dynft_swap_failures", "Versions refused by the server, by reason", ["reason"], registry=r
        )
        for reason in ("mismatch", "unreadable"):
            self.swap_failures.labels(reason)
        self.serving_fallback = _gauge(
            "dynft_serving_fallback",
            "1 while the server answers with an earlier version because the serving one cannot be loaded",
            r,
        )
        # Set where they change, and now: in multiprocess mode a gauge never written has no sample,
        # and an alert on "dynft_serving_version == 0" (nothing serves) would never fire.
        self.serving_version.set(0)
        self.serving_fallback.set(0)


class KafkaMetrics:
    """What the Kafka source reports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.lag = _gauge("dynft_kafka_lag", "Log end offset minus committed offset", r, ("topic", "partition"))
        self.records = Counter("dynft_kafka_records", "Records fetched from Kafka", ["topic"], registry=r)
        self.commit_seconds = Histogram(
            "dynft_kafka_commit_seconds", "Offset commit latency", registry=r, buckets=LATENCY
        )
        self.rebalances = Counter("dynft_kafka_rebalances", "Partition revocations seen by this consumer", registry=r)
        self.paused = _gauge("dynft_kafka_paused_partitions", "Partitions paused for backpressure", r)
        self.up = _gauge("dynft_kafka_up", "1 while the brokers answer, 0 during an outage", r)
        self.unreadable = Counter(
            "dynft_kafka_unreadable",
            "Fetches whose records could not be read (a corrupt batch): the partition is held and read again",
            ["topic", "partition"],
            registry=r,
        )


class SupervisorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.restarts = Counter("dynft_process_restarts", "Child processes restarted", ["process"], registry=registry)
        for process in ("trainer", "server"):
            self.restarts.labels(process)
