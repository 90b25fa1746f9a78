"""Inference for the command line: load a classifier (run dir, HF folder, packaged name), batch texts with the
training length buckets, turn logits into labels and probabilities, and score a labelled file."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxclf import assets, data
from flaxclf.config import DataConfig, MeshConfig, RunConfig, from_dict
from flaxclf.data import long_text, packing, tokens
from flaxclf.data.long_text import LongText
from flaxclf.hf import config as hf_config
from flaxclf.hf import peft, weights
from flaxclf.models.classifier import make_classifier
from flaxclf.models.interface import Classifier
from flaxclf.options import HF_POOLING, MULTI, REGRESSION, SINGLE
from flaxclf.runtime import sharding

log = logging.getLogger("flaxclf")

DEFAULT_BUCKETS = DataConfig().buckets
DEFAULT_MAX_LENGTH = DataConfig().max_length


class InferenceError(ValueError):
    """A model source or input the inference commands can't use; the message says what to pass instead."""


@dataclass
class Loaded:
    """A classifier ready for inference, with what it needs to tokenize and batch like its training did."""

    model: Classifier
    params: dict
    model_dir: Path  # holds the tokenizer files
    source: str  # how messages name it
    max_length: int
    buckets: list[int]
    run_config: RunConfig | None = None  # set when loaded from a run directory
    notes: list[str] = field(default_factory=list)
    # How texts longer than max_length are read, and how a text's windows combine (data.long_text).
    long_text: str = "truncate"
    stride: int = DataConfig().stride
    head_tokens: int | None = None
    chunk_aggregation: str = DataConfig().chunk_aggregation
    packing: bool = DataConfig().packing == "on"  # texts share rows (data.packing), where the backbone can

    @property
    def long_text_spec(self) -> LongText:
        return LongText(self.long_text, self.max_length, self.stride, self.head_tokens)

    def read_long_text(self, mode: str | None = None, stride: int | None = None, head_tokens: int | None = None,
                       aggregation: str | None = None) -> None:
        """Command-line choices over the run's data.long_text settings (None keeps the run's)."""
        self.long_text = mode or self.long_text
        self.stride = self.stride if stride is None else stride
        self.head_tokens = self.head_tokens if head_tokens is None else head_tokens
        self.chunk_aggregation = aggregation or self.chunk_aggregation

    @property
    def label_names(self) -> list[str]:
        return [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    @property
    def problem_type(self) -> str:
        return self.model.config.problem_type or (REGRESSION if self.model.config.num_labels == 1 else SINGLE)


def is_run_dir(path: str | Path) -> bool:
    """A flaxclf run directory: config.yaml with checkpoints/ or export/ next to it."""
    p = Path(path).expanduser()
    return (p / "config.yaml").is_file() and ((p / "checkpoints").is_dir() or (p / "export").is_dir())


def load(source: str, *, step: str | int | None = None, pooling: str | None = None, num_labels: int | None = None,
         max_length: int | None = None) -> Loaded:
    """A run directory (its checkpoint `step`: None = latest, 'best', or a number), an HF folder or a packaged
    model name. `pooling` and `num_labels` apply to HF folders and packaged names only."""
    if is_run_dir(source):
        if pooling is not None or num_labels is not None:
            raise InferenceError(f"{source} is a run directory: its pooling and labels come from its config.yaml; "
                                 "drop --pooling / --num-labels")
        return _load_run(Path(source).expanduser(), step, max_length)
    if step is not None:
        raise InferenceError(f"--step needs a run directory (with config.yaml and checkpoints/); {source} is not one")
    if peft.is_adapter(source):
        if pooling is not None or num_labels is not None:
            raise InferenceError(f"{source} is a LoRA adapter: its head comes from it; drop --pooling / --num-labels")
        model, params, folder = peft.load(source)
        tokens.require_tokenizer(folder)
        length = min(max_length or DEFAULT_MAX_LENGTH, hf_config.max_positions(folder) or 512)
        return Loaded(model, params, folder, str(source), length, list(DEFAULT_BUCKETS), None, [],
                      packing=DataConfig().packing == "on")
    if Path(source).expanduser().is_dir() and not (Path(source).expanduser() / "config.json").is_file():
        raise InferenceError(f"{source} is neither a run directory (config.yaml with checkpoints/ or export/) nor a "
                             "Hugging Face model folder (config.json); pass the train.output_dir of a `flaxclf "
                             "train` run or a folder saved with save_pretrained")
    folder = assets.resolve_model(source)
    length = min(max_length or DEFAULT_MAX_LENGTH, hf_config.max_positions(folder) or 512)
    tokens.require_tokenizer(folder)  # a folder without its tokenizer is refused before its weights are read
    overrides: dict[str, Any] = {"pooling": pooling or HF_POOLING}
    if num_labels is not None:
        overrides["num_labels"] = num_labels
    config = weights.classifier_config(folder, **overrides)
    model = make_classifier(config)
    params = weights.load_params(model, folder, jax.random.PRNGKey(0))
    notes = [] if _has_head(folder) else [f"{source} has no trained classifier head (a base model): the head is "
                                          "random, so its predictions mean nothing"]
    return Loaded(model, params, folder, str(source), length, list(DEFAULT_BUCKETS), None, notes,
                  packing=DataConfig().packing == "on" and model.impl == "fast")


def _has_head(folder: Path) -> bool:
    cfg = json.loads((folder / "config.json").read_text())
    return any("ForSequenceClassification" in a for a in cfg.get("architectures") or [])


def run_config(run_dir: Path) -> RunConfig:
    """The resolved settings a run directory was trained with (its config.yaml)."""
    import yaml

    return from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))


def _load_run(run_dir: Path, step: str | int | None, max_length: int | None) -> Loaded:
    """A run's checkpoint (params only, on one device), or its export/ folder when it has no checkpoints."""
    if (run_dir / "checkpoints").is_dir():
        from flaxclf.inference import runs  # orbax: only a run with checkpoints needs it

        one_device = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
        model, params, meta = runs.load_params_for_inference(run_dir, step, mesh=one_device)
        cfg = from_dict(meta["config"])
        which = f"checkpoint {meta['step']}"
        model_dir = Path(meta["model_dir"])
    else:
        if step is not None:
            raise InferenceError(f"{run_dir} has no checkpoints/, so --step can't be used")
        cfg = run_config(run_dir)
        model_dir = assets.resolve_model(cfg.model.name)
        # The export's config.json carries the head (labels, problem type, dropout); the run's the compute dtype.
        export = run_dir / "export"
        model = make_classifier(weights.classifier_config(export, pooling=cfg.model.pooling),
                                dtype=jnp.dtype(cfg.model.dtype), impl=cfg.model.impl)
        params, which = weights.load_params(model, export, jax.random.PRNGKey(0)), "export/"
    d = cfg.data
    return Loaded(model, params, model_dir, f"{run_dir} ({which})", max_length or d.max_length, list(d.buckets), cfg,
                  long_text=d.long_text, stride=d.stride, head_tokens=d.head_tokens,
                  chunk_aggregation=d.chunk_aggregation, packing=d.packing == "on" and cfg.model.impl == "fast")


# ---------------------------------------------------------------------------------------------- batching


def tokenize(loaded: Loaded, texts: Sequence[str], pairs: Sequence[str] | None) -> data.TokenizedSplit:
    """Texts as a labelless TokenizedSplit (one process), read as the model's long_text settings say."""
    spec = loaded.long_text_spec
    if pairs is not None and spec.mode != "truncate":
        raise InferenceError(f"long_text={spec.mode} works on single texts; pass --long-text truncate for pairs")
    tok = data.load_tokenizer(loaded.model_dir, spec.max_length)
    arrays = tokens.tokenize(tok, list(texts), list(pairs) if pairs is not None else None, spec)
    doc = arrays["doc"]
    return data.TokenizedSplit("predict", arrays["input_ids"], arrays["token_type_ids"], arrays["offsets"],
                               np.zeros(len(doc), np.int32), doc, len(texts), spec.max_length, 0, 1,
                               chunked=spec.mode == "chunks")


def _forward(model: Classifier):
    return jax.jit(lambda params, ids, mask, types, segments=None: model.apply(params, ids, mask, types,
                                                                                segments=segments),
                   static_argnames="segments")


def logits(loaded: Loaded, split: data.TokenizedSplit, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Float32 logits [N, C] of the split's texts in row order (a chunked split's windows aggregated per text),
    batched like evaluation in training: packed (about batch_size texts a batch) or by length bucket."""
    if len(split) == 0:
        return np.zeros((0, loaded.model.config.num_labels), np.float32)
    if loaded.packing:
        _, segments, slots, length = data.packed_eval_plan(split, batch_size, None)
        plan = [(segments, s[s >= 0], s >= 0) for s in slots]
        batches = (packing.host_batch(split, s, length) for s in slots)
    else:
        plan = [(None, idx, slice(len(idx))) for _, idx in data.eval_plan(split, batch_size, loaded.buckets, None)]
        batches = data.eval_batches(split, batch_size, loaded.buckets, None, prefetch=0)
    out = np.zeros((len(split), loaded.model.config.num_labels), np.float32)
    forward = _forward(loaded.model)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(split), unit="text", dynamic_ncols=True, leave=False)
    for (segments, idx, filled), batch in zip(plan, batches, strict=True):
        z = forward(loaded.params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], segments)
        out[idx] = np.asarray(z)[filled]
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    if split.chunked:
        return long_text.aggregate(loaded.problem_type, loaded.chunk_aggregation, out, split.rows)[1]
    return out


def probabilities(problem_type: str, z: np.ndarray) -> np.ndarray:
    """Softmax (single-label), sigmoid (multi-label) or the raw score (regression)."""
    z = np.asarray(z, np.float64)
    if problem_type == SINGLE:
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    if problem_type == MULTI:
        return 0.5 * (1.0 + np.tanh(0.5 * z))
    return z


def prediction_rows(loaded: Loaded, texts: Sequence[str], z: np.ndarray, threshold: float = 0.5) -> list[dict]:
    """One dict per text: {"text", "label", "probs"} (single), {"text", "labels", "probs"} (multi) or
    {"text", "score"} (regression)."""
    names, kind = loaded.label_names, loaded.problem_type
    p = probabilities(kind, z)
    rows = []
    for text, pi in zip(texts, p, strict=True):
        if kind == REGRESSION:
            rows.append({"text": text, "score": float(pi[0])})
            continue
        probs = {name: round(float(v), 6) for name, v in zip(names, pi, strict=True)}
        if kind == SINGLE:
            rows.append({"text": text, "label": names[int(pi.argmax())], "probs": probs})
        else:
            rows.append({"text": text, "labels": [n for n, v in zip(names, pi, strict=True) if v > threshold],
                         "probs": probs})
    return rows


# ---------------------------------------------------------------------------------------------- evaluation


def align_labels(labels: np.ndarray, file_names: list[str], loaded: Loaded, source: str) -> np.ndarray:
    """Re-indexes a data file's label ids (sorted file order) into the model's label order."""
    kind, model_names = loaded.problem_type, loaded.label_names
    if kind == REGRESSION or file_names == model_names:
        return labels
    if all(n in model_names for n in file_names):
        index = np.array([model_names.index(n) for n in file_names])
    elif all(n.isdigit() and int(n) < len(model_names) for n in file_names):
        index = np.array([int(n) for n in file_names])  # the file gives label ids
    else:
        unknown = [n for n in file_names if n not in model_names]
        raise InferenceError(f"{source} has labels {unknown[:5]} that the model does not know; its labels are "
                             f"{model_names} (or ids 0..{len(model_names) - 1})")
    if kind == MULTI:
        out = np.zeros((labels.shape[0], len(model_names)), labels.dtype)
        out[:, index] = labels
        return out
    return index[labels].astype(labels.dtype)


def eval_data_config(loaded: Loaded, file: str | None, **columns: Any) -> DataConfig:
    """The data to evaluate on: a file (read like a training file), else the run's own data settings, else the
    packaged task."""
    base = loaded.run_config.data if loaded.run_config is not None else DataConfig()
    cfg = DataConfig(**{**base.__dict__, "buckets": list(loaded.buckets), "max_length": loaded.max_length,
                        "long_text": loaded.long_text, "stride": loaded.stride, "head_tokens": loaded.head_tokens,
                        "chunk_aggregation": loaded.chunk_aggregation})
    if file is not None:
        if not Path(file).expanduser().exists():  # named as the user gave it, not as the data.train_file it becomes
            raise InferenceError(f"--data {file} does not exist; check the path")
        cfg.task, cfg.train_file, cfg.validation_file, cfg.test_file = None, file, None, None
        for k, v in columns.items():
            if v is not None:
                setattr(cfg, k, v)
        kind = loaded.problem_type
        if cfg.label_type == "auto" and kind in (REGRESSION, MULTI):
            cfg.label_type = "float" if kind == REGRESSION else "multi"
    return cfg
