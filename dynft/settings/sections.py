"""The settings' sections, one per module of the data flow (source, buffer, trainer, registry, server, ...).

Each is a pydantic model whose unknown keys are errors; ``dynft.settings.Settings`` nests them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator


class Section(BaseModel):
    """A configuration section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceSettings(Section):
    """Where labeled events come from (see ``dynft.sources``)."""

    uri: str = Field("demo", description="demo, file:PATH, file:- (stdin), or kafka://HOST:PORT/TOPIC[,TOPIC]?group=G")
    follow: bool = Field(False, description="file sources: keep reading appended lines, like tail -f")
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


class BufferSettings(Section):
    """The bounded replay buffer (see ``dynft.buffer``)."""

    max_events: int = Field(10_000, ge=1, description="events kept for replay")
    max_bytes: int = Field(64 << 20, ge=1024, description="approximate bytes kept for replay")
    strategy: Literal["reservoir", "class_balanced", "recency"] = Field(
        "class_balanced", description="what is kept when full and how replay is drawn"
    )
    replay_ratio: float = Field(0.5, ge=0, lt=1, description="share of each batch replayed from the buffer")
    recency_half_life: int = Field(2_000, ge=1, description="recency sampling: age in events at which weight halves")


class ModelSettings(Section):
    """The base model (see ``dynft.model``)."""

    path: str | None = Field(None, description="Hugging Face model directory; default: packaged all-MiniLM-L6-v2")
    max_length: int = Field(64, ge=8, le=8192, description="tokens per text; longer inputs are truncated for the model")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N")
    pooling: Literal["auto", "cls", "mean"] = Field(
        "auto",
        description="what the head reads: the [CLS] pooler or the masked token mean; auto: mean for "
        "sentence-transformers encoders trained with it (the default model); cls: the architecture's own "
        "(the last non-pad token for decoders)",
    )
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="base weights; auto: bf16 on a GPU with it, fp16 (loss-scaled) on one without, fp32 on CPU"
    )
    autocast: Literal["auto", "on", "off"] = Field(
        "auto",
        description="matrix products in bf16 (fp16 with fp16 weights) under torch.autocast, for the trainer, the "
        "gate and the server alike; auto: on a GPU, and on a CPU with native bf16 (AVX512-BF16 or AMX); "
        "off: fp32 products (needs fp32 base weights)",
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, more time")
    quantization: Literal["none", "8bit", "4bit"] = Field(
        "none", description="QLoRA: 4-/8-bit base weights through bitsandbytes (CUDA only)"
    )


class AdapterSettings(Section):
    """The PEFT method trained on top of the frozen base model."""

    method: Literal["lora", "ia3", "prefix", "prompt"] = Field(
        "lora", description="lora (with use_dora/use_rslora), ia3, prefix tuning, or prompt (soft prompt) tuning"
    )
    r: int = Field(8, ge=1, le=1024, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout")
    target_modules: list[str] | None = Field(None, description="default: peft's choice for the architecture")
    use_dora: bool = Field(False, description="weight-decomposed LoRA (DoRA)")
    use_rslora: bool = Field(False, description="rank-stabilised scaling alpha / sqrt(r)")
    num_virtual_tokens: int = Field(16, ge=1, description="prefix and prompt tuning only")


class TrainerSettings(Section):
    """The online trainer (see ``dynft.trainer``)."""

    batch_size: int = Field(16, ge=1, description="rows per step, fresh and replayed")
    lr: float = Field(2e-3, gt=0, le=1.0, description="learning rate of the adapter weights")
    head_lr: float = Field(6e-3, gt=0, le=1.0, description="learning rate of the classification head")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay of the adapter weights")
    warmup_steps: int = Field(20, ge=0, description="linear learning-rate warm-up")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = the cores left after the server's")
    seed: int = Field(0, description="seed of weights initialisation and replay sampling")
    fresh_wait_s: float = Field(0.5, gt=0, description="how long a step waits to fill its fresh share")
    freshest_first_backlog: int = Field(
        0,
        ge=0,
        description="when more records than this wait in the intake, a step trains on the newest and the older "
        "ones go to the replay buffer (ledger outcome buffered), so a trainer behind its feed stays fresh; 0: off",
    )
    compile: bool = Field(
        False,
        description="torch.compile the training step's forward and backward (off: not yet measured to win; "
        "python -m benchmarks --compile times it); steps that read the head's input run eagerly",
    )
    compile_backend: str = Field("inductor", min_length=1, description="torch.compile backend")
    pad_multiple: int = Field(
        0,
        ge=0,
        le=512,
        description="pad training batches to a multiple of this many tokens; 0: 16 with compile, else none",
    )
    imprint_new_labels: Literal["auto", "on", "off"] = Field(
        "auto",
        description="start a new label's head row at its first examples' mean feature (weight imprinting); "
        "auto: on when the model pools by mean (a sentence encoder, whose features already separate texts)",
    )
    anchor_weight: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="L2 pull of the adapter toward the serving version, against forgetting; 0 = off",
    )
    ewc_weight: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="EWC: L2 pull toward the serving version weighted by a diagonal Fisher estimate "
        "(mean 1) made at each promotion, against forgetting; 0 = off",
    )
    lwf_weight: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="learning without forgetting: weight of distilling the serving version's outputs "
        "on replayed events (at trainer.distill_temperature); 0 = off",
    )
    fisher_events: int = Field(64, ge=1, description="EWC: most recent training events the Fisher estimate uses")
    distill_alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        description="share of the teacher's soft loss in the loss of an event with a label and a teacher "
        "(knowledge distillation); an event with a teacher and no label learns from the teacher alone",
    )
    distill_temperature: float = Field(
        2.0, gt=0, le=100, allow_inf_nan=False, description="temperature of the distillation loss (student and teacher)"
    )
    max_labels: int = Field(
        1000,
        ge=1,
        description="labels the head may grow to; an event with a new label beyond it is rejected (too_many_labels)",
    )


class EvaluationSettings(Section):
    """Prequential metrics and the held-out window (see ``dynft.evaluation``)."""

    window: int = Field(500, ge=10, description="events in the rolling prequential window")
    holdout_fraction: float = Field(0.1, ge=0, lt=1, description="share of events kept out of training")
    holdout_window: int = Field(256, ge=8, description="most recent held-out events the gate scores on")


class DriftSettings(Section):
    """Drift detection on the prequential streams (see ``dynft.drift``)."""

    error_detector: str = Field("ADWIN", description="river.drift detector on the 0/1 prequential error")
    error_params: dict[str, Any] = Field(default_factory=dict, description="its constructor parameters")
    loss_detector: str = Field("PageHinkley", description="river.drift detector on the prequential loss")
    loss_params: dict[str, Any] = Field(
        default_factory=lambda: {"min_instances": 100, "delta": 0.25, "threshold": 60.0, "mode": "up"},
        description="its constructor parameters",
    )
    label_detector: str = Field(
        "PageHinkley", description="river.drift detector on the label shares of adjacent windows (NoDrift: off)"
    )
    label_params: dict[str, Any] = Field(
        default_factory=lambda: {"min_instances": 20, "delta": 0.15, "threshold": 2.0, "mode": "up"},
        description="its constructor parameters",
    )
    label_window: int = Field(20, ge=1, description="events in each of the two windows whose label shares are compared")
    representation_detector: str = Field(  # off: features move while a model learns (false alarms)
        "NoDrift",
        description="river.drift detector on the pooled embeddings' distance from their mean (NoDrift: off)",
    )
    representation_params: dict[str, Any] = Field(
        default_factory=lambda: {"min_instances": 30, "delta": 0.1, "threshold": 10.0, "mode": "up"},
        description="its constructor parameters",
    )
    representation_dims: int = Field(16, ge=1, description="random projection of the embeddings watched")
    reactions: list[Literal["boost", "upweight", "new_lineage", "retire"]] = Field(
        default_factory=lambda: ["boost", "upweight", "retire"],  # type: ignore[arg-type]
        description="what a detection triggers: boost (learning rate and steps), upweight (recent events), "
        "new_lineage (fresh adapter and replay memory), retire (pre-drift replay, on a confirmed concept change)",
    )
    concept_confirm_events: int = Field(
        30, ge=1, description="events after an error/loss detection that confirm a concept change (or not)"
    )
    concept_error_rise: float = Field(
        0.3, ge=0, le=1, description="rise of the error on known labels that confirms a concept change"
    )
    boost_lr_factor: float = Field(3.0, ge=1, description="learning-rate multiplier while boosted")
    boost_steps: int = Field(100, ge=1, description="how long a reaction lasts, in training steps")
    boost_extra_steps: int = Field(1, ge=0, description="extra replay steps per fresh step while boosted")
    upweight_share: float = Field(0.5, ge=0, le=1, description="share of replay drawn from post-drift events")
    cooldown_events: int = Field(200, ge=0, description="events after a reaction before the next one")


class RegistrySettings(Section):
    """Publishing adapter versions (see ``dynft.registry``)."""

    publish_every_steps: int = Field(50, ge=1, description="publish a candidate after this many steps...")
    publish_interval_s: float = Field(20.0, gt=0, description="...or this many seconds, whichever comes first")
    keep_last: int = Field(10, ge=1, description="versions kept besides the serving one and its history")
    keep_serving_history: int = Field(5, ge=0, description="earlier serving versions kept for rollback")
    first_publish_steps: int = Field(
        3, ge=1, description="while nothing serves, publish after this many steps (cold start) instead of waiting"
    )
    publish_on_new_label: bool = Field(True, description="publish at the next step when a label is seen first")
    publish_fresh: bool = Field(
        True,
        description="publish right after a step that trained new events (a quick gate check, see gate.quick_events), "
        "within publish_budget while training work waits",
    )
    publish_budget: float = Field(
        0.1, gt=0, le=1, description="share of the trainer's time fresh publishing may take while training work waits"
    )


class GateSettings(Section):
    """The promotion gate (see ``dynft.gate``)."""

    tolerance: float = Field(0.01, ge=0, le=1, description="accuracy a candidate may lose and still be promoted")
    min_holdout: int = Field(32, ge=1, description="held-out events needed before a candidate can be judged")
    quick_events: int = Field(
        32,
        ge=0,
        description="between full checks (every registry.publish_every_steps / publish_interval_s), a candidate is "
        "judged on this many newest held-out events; 0: every check scores the whole window",
    )

    @model_validator(mode="after")
    def _quick_judges(self) -> GateSettings:
        if 0 < self.quick_events < self.min_holdout:
            raise ValueError(
                f"gate.quick_events = {self.quick_events} is below gate.min_holdout = {self.min_holdout}: "
                "no quick check could judge; raise it or set 0"
            )
        return self


class ServerSettings(Section):
    """The inference server (see ``dynft.serving``)."""

    host: str = Field("127.0.0.1", description="address the HTTP API listens on")
    port: int = Field(8000, ge=0, le=65535, description="port of the HTTP API (and /metrics)")
    admin_token: SecretStr | None = Field(None, description="bearer token of the admin API; default: generated")
    max_batch: int = Field(32, ge=1, description="texts per micro-batch")
    max_wait_ms: float = Field(2.0, ge=0, description="how long a micro-batch waits for more requests")
    max_texts: int = Field(32, ge=1, description="texts per request (at most max_batch)")
    max_queue: int = Field(4096, ge=1, description="texts waiting before requests are refused with 503")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies are refused with 413")
    request_timeout_s: float = Field(30.0, gt=0, description="a prediction not answered by then gets 504")
    body_timeout_s: float = Field(
        10.0, gt=0, description="a request body not fully received by then gets 408 and the connection is closed"
    )
    limit_concurrency: int = Field(
        256, ge=1, description="open connections and requests at most; beyond it new requests get 503 at once"
    )
    poll_interval_s: float = Field(0.2, gt=0, description="how often the server looks for a new serving version")
    threads: int = Field(1, ge=1, description="torch CPU threads of the server")
    console_show_texts: bool | None = Field(
        None,
        description="show dead letters' texts (cut to 120 chars) on the console at /; "
        "default: on for the demo source, off otherwise",
    )
    prototypes: bool = Field(
        True,
        description="the fast path: answer labels that no serving version knows yet (and before the first "
        "version) from class prototypes of their first events, handed over by the trainer",
    )
    prototype_shots: int = Field(
        8, ge=1, le=256, description="labelled events per label that the trainer hands to the fast path"
    )

    @field_validator("max_texts")
    @classmethod
    def _texts_fit_a_batch(cls, v: int, info: Any) -> int:
        batch = info.data.get("max_batch", v)
        if v > batch:
            raise ValueError(f"must be at most server.max_batch ({batch}), got {v}")
        return v


class TasksSettings(Section):
    """Many tasks on one base model (see ``dynft.tasks``): each task has its own adapter, head and versions."""

    max_tasks: int = Field(
        64,
        ge=1,
        le=1024,
        description="tasks one daemon learns; events of a task beyond it are rejected (too_many_tasks)",
    )
    sharing: Literal["per_task", "shared"] = Field(
        "per_task",
        description="per_task: an adapter and head per task (a drift in one cannot disturb another); shared: "
        "one adapter trained by every task, a head per task, versions published and promoted together",
    )
    fill_wait_s: float = Field(
        2.0,
        gt=0,
        description="how long a task's fresh events wait, while the trainer trains other tasks, to fill the task's "
        "fresh share of a step (a partial share costs a whole batch); nothing waits once the intake is empty",
    )


class RunSettings(Section):
    """The supervisor of ``dynft run`` (see ``dynft.supervisor``)."""

    status_interval_s: float = Field(5.0, gt=0, description="how often the status line is printed")
    shutdown_timeout_s: float = Field(60.0, gt=0, description="grace period before children are killed")
    restart_backoff_s: float = Field(1.0, gt=0, description="first delay before restarting a crashed child")
    restart_backoff_max_s: float = Field(30.0, gt=0, description="the delay doubles up to this")
