"""Typed run configuration: every field and its default live here, loaded from YAML with dotted overrides."""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from flaxclf.options import (
    HF_POOLING,
    ChunkAggregation,
    FileFormat,
    Impl,
    LongText,
    Pooling,
    ProblemType,
    hf_flax_problem,
)


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message says which key and what is allowed."""


@dataclass
class LoraConfig:
    # LoRA (README, "LoRA"): null trains every weight; a rank trains low-rank adapters of that rank on `targets`
    # and the classifier head, as peft's LoraConfig(task_type="SEQ_CLS") does, and freezes the rest.
    rank: int | None = None
    alpha: float = 8.0  # the adapter's output is scaled by alpha / rank (peft's lora_alpha, default 8)
    dropout: float = 0.0  # on the adapter's input (peft's lora_dropout)
    # Layers to adapt, by their names in the model's state dict, as peft's target_modules: a layer matches a name
    # equal to its full name or to its end after a dot. null: the family's default (README, "LoRA").
    targets: list[str] | None = None


@dataclass
class ModelConfig:
    # A packaged model name (see flaxclf.assets), a local Hugging Face folder, or a hub id.
    name: str = "minilm-l6"
    pooling: Pooling = HF_POOLING
    # None: inferred as PyTorch does (num_labels == 1 -> regression, list labels -> multi-label, else single).
    problem_type: ProblemType | None = None
    # None: use the backbone's hidden_dropout_prob, as BertForSequenceClassification does.
    classifier_dropout: float | None = None
    # Compute dtype. With impl=fast, bfloat16 is mixed precision (matmul inputs bf16, fp32 accumulation, the rest
    # fp32; its speed on a CPU with AVX-512 bf16: bench/README.md); with impl=hf every op runs in it.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # storage dtype of the parameters
    remat: bool = False  # gradient checkpointing of each encoder layer (ModernBERT: of each group of layers)
    # The encoder. fast: flaxclf's own (flaxclf.models), FlaxBertModule's params, init and dropout masks in a
    # layout XLA runs faster, computing only position 0 in the last layer under [CLS] pooling. hf:
    # transformers' FlaxBertModule itself. Both match PyTorch's BertForSequenceClassification in fp32.
    impl: Impl = "fast"
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    # A packaged task name (see flaxclf.assets) or null when the files below are given.
    task: str | None = "rt-snippets-4way"
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    format: FileFormat | None = None  # None: from the file extension
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    label_type: Literal["auto", "string", "int", "float", "multi"] = "auto"
    max_length: int = 128
    # Several texts share each row (packing_length), told apart by segment ids; each text's outputs are those it
    # has alone (README, "Packing"). on: pads least and compiles at most packing_shapes train steps (one static
    # shape with packing_shapes=1, as a TPU wants); off: each batch pads its texts to a length bucket. on ran the main
    # job in 0.94x the wall time of off, with 0.69x its peak memory, on a 2-core CPU (bench/README.md, section
    # 2c): on is the default.
    packing: Literal["on", "off"] = "on"
    # packing: the most row counts a run's train steps take; 1 = one static shape (TPU). On the main job a fourth
    # shape saves less step time than its compile takes (bench/README.md, section 2c).
    packing_shapes: int = 3
    # packing: a row's tokens; null: the split's longest text rounded up to a multiple of 16 (at most max_length),
    # since every token's attention spans its row. Set it (>= the longest text) for one row length whatever the data.
    packing_length: int | None = None
    # Padded lengths of unpacked batches; each batch pads to the smallest bucket that holds its longest row.
    buckets: list[int] = field(default_factory=lambda: [16, 24, 32, 40, 48, 64, 128])
    empty_text: Literal["error", "skip"] = "error"
    cache_dir: str | None = None  # tokenization cache; None: under the flaxclf cache
    prefetch: int = 2  # batches placed on the devices ahead of the step
    # Texts longer than max_length. truncate: keep the first tokens. head_tail: keep the first head_tokens and
    # the last (max_length - specials - head_tokens) tokens (Sun et al. 2019). chunks: windows of max_length
    # overlapping by `stride` tokens, each with its text's label; evaluation and predict aggregate a text's
    # windows (chunk_aggregation) so every metric counts texts.
    long_text: LongText = "truncate"
    stride: int = 32  # chunks: tokens each window shares with the one before
    head_tokens: int | None = None  # head_tail: tokens kept from the start; None: a quarter of the window
    chunk_aggregation: ChunkAggregation = "mean_logits"


@dataclass
class LossConfig:
    # Per-class weights of the single-label loss: none, balanced (n_samples / (n_classes * count) over the
    # training split, as scikit-learn computes it), a list in label order, or a mapping label name -> weight
    # (labels left out weigh 1). PyTorch's CrossEntropyLoss(weight=...): a weighted mean.
    class_weights: Literal["none", "balanced"] | list[float] | dict[str, float] = "none"
    # Multi-label: the weight of each label's positive term, as BCEWithLogitsLoss(pos_weight=...): none,
    # balanced (negatives / positives per label over the training split), one number for every label, a list
    # in label order, or a mapping label name -> weight.
    pos_weight: Literal["none", "balanced"] | float | list[float] | dict[str, float] = "none"
    label_smoothing: float = 0.0  # single-label: CrossEntropyLoss(label_smoothing=...)


@dataclass
class MeshConfig:
    # Sizes of the (data, fsdp, tensor) axes; one of them may be -1 to take the remaining devices.
    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclass
class OptimConfig:
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = 0.06  # fraction of all steps spent warming up linearly from 0
    max_grad_norm: float | None = 1.0  # None: no clipping
    grad_accum_steps: int = 1  # micro-batches per optimizer step; each is global_batch_size / grad_accum_steps


@dataclass
class TrainConfig:
    global_batch_size: int = 32
    eval_batch_size: int = 64
    epochs: int = 3
    max_steps: int | None = None  # None: epochs decide
    eval_every: int = 0  # steps; 0: at the end of each epoch
    log_every: int = 50
    seed: int = 0
    best_metric: str = "accuracy"  # eval metric that picks the exported model
    # Stop after this many evaluations in a row without best_metric improving on its best by more than
    # early_stopping_min_delta; null: never stop early. The best model is exported as usual.
    early_stopping_patience: int | None = None
    early_stopping_min_delta: float = 0.0
    export: Literal["best", "final"] = "best"
    output_dir: str = "runs/default"
    # Keep the compiled steps (JAX's persistent compilation cache), so that a later run with the same shapes
    # reads them instead of compiling; results are the same either way. Dir None: <flaxclf cache>/xla.
    compilation_cache: bool = True
    compilation_cache_dir: str | None = None
    # The flaxclf command keeps the memory XLA frees for reuse (flaxclf.runtime.hostmem); above this many GB of resident
    # memory the kept heap's free pages go back to the kernel. null: one step's working set (the memory held once
    # the steps are compiled plus 1.25 x the largest step's temporaries); 0: never (the heap only grows). Either
    # cap rises where a trim shows a step needs more (hostmem.HeapCap).
    host_memory_cap_gb: float | None = None


@dataclass
class CheckpointConfig:
    every_steps: int = 200  # 0: only at the end and on preemption
    keep: int = 2
    async_save: bool = True
    fresh: bool = False  # discard the checkpoints already in the run directory instead of resuming


@dataclass
class DistributedConfig:
    # auto: initialize when a TPU pod, SLURM or the coordinator fields say there are several processes.
    mode: Literal["auto", "off", "on"] = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    cpu_collectives: Literal["gloo", "mpi", "none"] = "gloo"


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _allowed(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Checks `value` against the annotation `tp`; returns it (ints widen to floats)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(key, value, opt)
            except ConfigError as e:
                errors.append(str(e))
        raise errors[0] if len(errors) == 1 else ConfigError(f"{key}: {value!r} is not allowed ({'; '.join(errors)})")
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(get_args(tp)):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not allowed; use {_allowed(tp)}")
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: {value!r} is not a list; write it as [a, b, ...]")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, value_tp = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: {value!r} is not a mapping; write it as {{name: value, ...}}")
        return {_coerce(key, k, key_tp): _coerce(f"{key}[{k!r}]", v, value_tp) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not a bool; use true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: {value!r} is not an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, where a float needs a dot: 3e-5 (no dot) arrives here as a string.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: {value!r} is not a number")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float, datetime.date)) and not isinstance(value, bool):
            value = str(value)  # YAML reads 2024-01-01 or 123 as a date or a number; a name wants the text
        if not isinstance(value, str):
            raise ConfigError(f"{key}: {value!r} is not a string")
        return value
    raise TypeError(f"unsupported config annotation {tp} for {key}")


def _unknown(key: str, choices: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(choices)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _merge(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    """Applies a nested dict onto a dataclass instance in place, type-checking each value."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise _unknown(key, names)
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a mapping of its fields, got {v!r}")
            _merge(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(key, v, hints[k]))


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def parse_override(text: str) -> dict[str, Any]:
    """'train.epochs=3' -> {'train': {'epochs': 3}}; the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.epochs=3)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return _nest(key.strip(), value)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """Reads a config file and the chain of `base:` files it names (relative to itself), base first."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"config {path} includes itself through 'base:'")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        # str(e) spans several lines (context, snippet, caret); a user error is one line.
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (model:, data:, train:, ...)")
    base = doc.pop("base", None)
    chain = _read_yaml(path.parent / base, seen + (path.resolve(),)) if base else []
    return chain + [doc]


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults <- YAML file (and its `base:` chain) <- dotted overrides, then validation."""
    cfg = RunConfig()
    docs = _read_yaml(Path(path)) if path else []
    for doc in docs:
        _merge(cfg, doc)
    for text in overrides:
        _merge(cfg, parse_override(text))
    validate(cfg)
    return cfg


def from_dict(d: dict[str, Any]) -> RunConfig:
    cfg = RunConfig()
    _merge(cfg, d)
    validate(cfg)
    return cfg


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: RunConfig) -> None:
    """Cross-field checks a type can't express."""
    d, t, o, m = cfg.data, cfg.train, cfg.optim, cfg.mesh
    _check(d.task is not None or d.train_file is not None,
           "data.task is null and no data.train_file is given: name a packaged task or a training file")
    _check(d.max_length >= 2, f"data.max_length: {d.max_length} is too small; use at least 2")
    _check(len(d.buckets) > 0 and all(b > 0 for b in d.buckets),
           f"data.buckets: {d.buckets} must be a non-empty list of positive lengths")
    _check(d.prefetch >= 0, f"data.prefetch: {d.prefetch} must be >= 0")
    _check(d.packing_shapes >= 1, f"data.packing_shapes: {d.packing_shapes} must be >= 1")
    _check(d.packing_length is None or 1 <= d.packing_length <= d.max_length,
           f"data.packing_length: {d.packing_length} must be in [1, data.max_length {d.max_length}], or null to fit "
           "the rows to the texts")
    _check(d.stride >= 0, f"data.stride: {d.stride} must be >= 0")
    _check(d.head_tokens is None or d.head_tokens >= 0, f"data.head_tokens: {d.head_tokens} must be >= 0 or null")
    _check(d.long_text == "truncate" or d.text_pair_column is None,
           f"data.long_text={d.long_text} works on single texts; with data.text_pair_column use truncate")
    _check(t.early_stopping_patience is None or t.early_stopping_patience >= 1,
           f"train.early_stopping_patience: {t.early_stopping_patience} must be >= 1 or null")
    _check(t.early_stopping_min_delta >= 0,
           f"train.early_stopping_min_delta: {t.early_stopping_min_delta} must be >= 0")
    _check(t.host_memory_cap_gb is None or t.host_memory_cap_gb >= 0,
           f"train.host_memory_cap_gb: {t.host_memory_cap_gb} must be >= 0 (0: never trim) or null (automatic)")
    ls = cfg.loss.label_smoothing
    _check(0.0 <= ls < 1.0, f"loss.label_smoothing: {ls} must be in [0, 1)")
    _check(t.global_batch_size > 0, f"train.global_batch_size: {t.global_batch_size} must be positive")
    _check(t.eval_batch_size > 0, f"train.eval_batch_size: {t.eval_batch_size} must be positive")
    _check(t.epochs > 0, f"train.epochs: {t.epochs} must be positive")
    _check(t.max_steps is None or t.max_steps > 0, f"train.max_steps: {t.max_steps} must be positive or null")
    _check(t.eval_every >= 0 and t.log_every > 0, "train.eval_every must be >= 0 and train.log_every > 0")
    _check(o.grad_accum_steps >= 1, f"optim.grad_accum_steps: {o.grad_accum_steps} must be >= 1")
    _check(t.global_batch_size % o.grad_accum_steps == 0,
           f"train.global_batch_size {t.global_batch_size} does not divide into optim.grad_accum_steps "
           f"{o.grad_accum_steps} micro-batches; pick sizes where it does")
    _check(0.0 <= o.warmup_ratio <= 1.0, f"optim.warmup_ratio: {o.warmup_ratio} must be in [0, 1]")
    _check(o.learning_rate > 0, f"optim.learning_rate: {o.learning_rate} must be positive")
    _check(o.max_grad_norm is None or o.max_grad_norm > 0, "optim.max_grad_norm must be positive or null")
    hf_problem = hf_flax_problem() if cfg.model.impl == "hf" else None
    _check(hf_problem is None, hf_problem or "")
    _check(d.packing == "off" or cfg.model.impl == "fast",
           f"data.packing=on gives the encoder segment ids, which model.impl={cfg.model.impl} (transformers' "
           "FlaxBertModule) does not take; set data.packing=off")
    lr = cfg.model.lora
    _check(lr.rank is None or lr.rank >= 1,
           f"model.lora.rank: {lr.rank} must be >= 1, or null to train every weight")
    _check(lr.alpha > 0, f"model.lora.alpha: {lr.alpha} must be positive")
    _check(0.0 <= lr.dropout < 1.0, f"model.lora.dropout: {lr.dropout} must be in [0, 1)")
    _check(lr.targets is None or len(lr.targets) > 0,
           "model.lora.targets: [] adapts nothing; name layers, or null for the family's default")
    _check(lr.rank is None or cfg.model.impl == "fast",
           "model.lora adapts flaxclf's own encoder; transformers' FlaxBertModule (model.impl=hf) has none of its "
           "layers: set model.impl=fast")
    cd = cfg.model.classifier_dropout
    _check(cd is None or 0.0 <= cd < 1.0, f"model.classifier_dropout: {cd} must be in [0, 1) or null")
    sizes = [m.data, m.fsdp, m.tensor]
    _check(all(s == -1 or s >= 1 for s in sizes) and sizes.count(-1) <= 1,
           f"mesh: sizes (data={m.data}, fsdp={m.fsdp}, tensor={m.tensor}) must be >= 1, with at most one -1")
    _check(cfg.checkpoint.every_steps >= 0 and cfg.checkpoint.keep >= 1,
           "checkpoint.every_steps must be >= 0 and checkpoint.keep >= 1")
