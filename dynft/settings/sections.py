"""The settings' sections, one per module of the data flow (buffer, trainer, registry, server, ...).

Each is a pydantic model whose unknown keys are errors; ``dynft.settings.Settings`` nests them.
The intake side's (source, Kafka, events, checkpoint, ledger) are in ``dynft.settings.intake``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator


class Section(BaseModel):
    """A configuration section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # NaN passes no bound


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
    attention_dropout: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="dropout on attention weights while training; null: the model's own (0.1 for BERT-style "
        "encoders). 0 lets torch's CPU attention take its fused kernel (no score matrices kept for the "
        "backward pass), but on a 2-core CPU it trained 25-35% slower and lost 4 points on the quick domain stream",
    )
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

    batch_size: int = Field(
        16, ge=1, le=4096, description="rows per step, fresh and replayed (at most 4096: one step is one forward pass)"
    )
    lr: float = Field(2e-3, gt=0, le=1.0, description="learning rate of the adapter weights")
    head_lr: float = Field(6e-3, gt=0, le=1.0, description="learning rate of the classification head")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay of the adapter weights")
    warmup_steps: int = Field(20, ge=0, description="linear learning-rate warm-up")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = the cores left after the server's")
    seed: int = Field(0, description="seed of weights initialisation and replay sampling")
    fresh_wait_s: float = Field(0.5, gt=0, description="how long a step waits to fill its fresh share")
    freshest_first_backlog: int = Field(
        16,
        ge=0,
        description="a trainer behind a live feed (more records than this queued for freshest_first_after_s, after "
        "it caught up with its source once) trains on the newest and sends older ones to the replay buffer "
        "(ledger outcome buffered), so what is served stays fresh; a backlog read at start is trained whole; 0: off",
    )
    freshest_first_after_s: float = Field(
        10.0,
        ge=0,
        description="how long more than freshest_first_backlog records must wait before the trainer counts as "
        "slower than its feed (a burst drained sooner is trained whole)",
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
        description="pad batches (training, gate, server) to a multiple of this many tokens; "
        "0: 16 with compile or bf16/fp16 compute (model.autocast), else none",
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
    # At least 0.05: below it the loss's T^2 factor underflows while the tempered logits overflow,
    # and every step with a teacher is skipped as non-finite (a probe's 1e-300); 0.05 already
    # makes the teacher almost one-hot.
    distill_temperature: float = Field(
        2.0,
        ge=0.05,
        le=100,
        allow_inf_nan=False,
        description="temperature of the distillation loss (student and teacher)",
    )
    lexical_blend: bool = Field(
        True,
        description="keep word counts per label (naive Bayes over hashed words) beside the adapter and serve a "
        "blend of both, weighted by how well each predicted the stream's recent events (dynft.lexical)",
    )
    lexical_buckets: int = Field(
        1 << 15, ge=1 << 10, le=1 << 20, description="hash buckets of the word counts (4 bytes per label each)"
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
    input_detector: str = Field(
        "PageHinkley",
        description="river.drift detector on surface statistics of windows of texts (length, case...; NoDrift: off)",
    )
    input_params: dict[str, Any] = Field(
        default_factory=lambda: {"min_instances": 5, "delta": 2.0, "threshold": 40.0, "mode": "up"},
        description="its constructor parameters",
    )
    input_window: int = Field(10, ge=2, description="texts per window compared with those since the last detection")
    representation_detector: str = Field(
        "PageHinkley",
        description="river.drift detector on windows of a projection of the texts' token embeddings (NoDrift: off)",
    )
    representation_params: dict[str, Any] = Field(
        default_factory=lambda: {"min_instances": 5, "delta": 0.5, "threshold": 5.0, "mode": "up"},
        description="its constructor parameters",
    )
    representation_dims: int = Field(64, ge=1, description="random projection of the token embeddings watched")
    representation_window: int = Field(
        10, ge=2, description="texts per window compared with those since the last detection"
    )
    reactions: list[Literal["boost", "upweight", "new_lineage", "retire"]] = Field(
        default_factory=lambda: ["boost", "upweight", "retire"],  # type: ignore[arg-type]
        description="what a detection triggers: boost (learning rate and steps), upweight (recent events), "
        "new_lineage (fresh adapter and replay memory), retire (pre-drift replay, on a confirmed concept change)",
    )
    concept_confirm_events: int = Field(
        30,
        ge=1,
        description="events in a row whose error confirms a concept change, within twice as many after an "
        "error/loss detection",
    )
    concept_error_rise: float = Field(
        0.3, ge=0, le=1, description="rise of the error on known labels that confirms a concept change"
    )
    boost_lr_factor: float = Field(3.0, ge=1, description="learning-rate multiplier while boosted")
    boost_steps: int = Field(100, ge=1, description="how long a reaction lasts, in training steps")
    boost_extra_steps: int = Field(
        1, ge=0, description="extra replay steps per fresh step while boosted and no fresh work waits"
    )
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

    host: str = Field("127.0.0.1", description="address the HTTP API listens on (0.0.0.0: every interface)")
    port: int = Field(8000, ge=0, le=65535, description="port of the HTTP API (and /metrics)")
    admin_token: SecretStr | None = Field(None, description="bearer token of the admin API; default: generated")
    max_batch: int = Field(32, ge=1, description="texts per micro-batch")
    max_wait_ms: float = Field(2.0, ge=0, description="how long a micro-batch waits for more requests")
    max_texts: int = Field(32, ge=1, description="texts per request (at most max_batch)")
    max_queue: int = Field(
        4096,
        ge=1,
        description="texts waiting before requests are refused with 503 (also refused: a request whose wait "
        "would pass request_timeout_s at the measured throughput)",
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies are refused with 413")
    request_timeout_s: float = Field(30.0, gt=0, description="a prediction not answered by then gets 504")
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a connection that has not sent a whole request head by then (since it opened, or since its "
        "last response) is closed",
    )
    body_timeout_s: float = Field(
        10.0, gt=0, description="a request body not fully received by then gets 408 and the connection is closed"
    )
    limit_concurrency: int = Field(
        256, ge=1, description="connections served at once; a new one beyond them gets 503 overloaded and is closed"
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

    @field_validator("host")
    @classmethod
    def _host_not_blank(cls, v: str) -> str:
        if not v.strip():  # an unset shell variable: uvicorn would listen on every interface
            raise ValueError("is blank; name an address (0.0.0.0 for every interface)")
        return v

    @model_validator(mode="after")
    def _queue_takes_a_request(self) -> ServerSettings:
        if self.max_queue < self.max_texts:  # a full request could never be queued: 503 forever
            raise ValueError(
                f"server.max_queue = {self.max_queue} is below server.max_texts = {self.max_texts}: a request of "
                "max_texts could never be queued; raise max_queue or lower max_texts"
            )
        return self


class TasksSettings(Section):
    """Many tasks on one base model (see ``dynft.tasks``): each task has its own adapter, head and versions."""

    max_tasks: int = Field(
        64,
        ge=1,
        le=1024,
        description="tasks one daemon learns, the default task included; events of a task beyond it are rejected "
        "(too_many_tasks)",
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
