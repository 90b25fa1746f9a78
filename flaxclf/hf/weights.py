"""Hugging Face checkpoints <-> flaxclf params: PyTorch/Flax names, a strict merge, export to HF's format."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from flaxclf import assets
from flaxclf.hf.config import read_hf_config
from flaxclf.models.classifier import ClassifierConfig, cast_floats, dummy_inputs, make_classifier
from flaxclf.models.family import Family
from flaxclf.models.interface import Classifier
from flaxclf.models.registry import FAMILIES
from flaxclf.nn import lora
from flaxclf.options import HF_POOLING
from flaxclf.runtime import outputs

log = logging.getLogger("flaxclf")

Path_ = tuple[str, ...]
# Every file of a slow or fast tokenizer of the supported families (BERT/ELECTRA/DistilBERT vocab.txt, RoBERTa
# vocab.json + merges.txt, ALBERT spiece.model, XLM-R/CamemBERT sentencepiece.bpe.model, DeBERTa-v3 spm.model).
TOKENIZER_FILES = ("vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "spm.model",
                   "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
EXPORT_FILES = frozenset({"config.json", "model.safetensors", *TOKENIZER_FILES})  # all an export may write
HEAD = ("classifier",)
WEIGHT_SUFFIXES = (".safetensors", ".msgpack", ".bin")
POOLER = ("pooler",)


class WeightsError(ValueError):
    """A checkpoint that does not fit the model; the message lists the names."""


# ---------------------------------------------------------------------------------------------- names
def _leaf(mods: tuple[str, ...], pt_leaf: str) -> tuple[str, bool]:
    """(flax leaf name, whether the tensor is a transposed Linear weight) of a canonical module's PyTorch leaf."""
    if pt_leaf in ("bias", "beta"):
        return "bias", False
    if "LayerNorm" in mods[-1] or mods[-1].endswith("norm") or pt_leaf == "gamma":  # ModernBERT's: *norm
        return "scale", False
    if mods[-1].endswith("embeddings"):
        return "embedding", False
    return "kernel", True


def pt_to_flax(family: Family, name: str) -> tuple[Path_, bool] | None:
    """A PyTorch state-dict name -> (our param path, whether to transpose); None for a name the family lacks."""
    canonical = family.to_canonical(name)
    if canonical is None:
        return None
    *mods, pt_leaf = canonical.split(".")
    leaf, transpose = _leaf(tuple(mods), pt_leaf)
    return (*mods, leaf), transpose


def flax_to_pt(family: Family, path: Path_) -> tuple[str, bool]:
    """Our param path -> (the family's PyTorch *ForSequenceClassification name, whether to transpose)."""
    *mods, leaf = path
    pt_leaf = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}[leaf]
    return family.to_hf(".".join([*mods, pt_leaf])), leaf == "kernel"


# ---------------------------------------------------------------------------------------------- reading
def read_checkpoint(folder: Path, family: Family) -> dict[Path_, np.ndarray]:
    """The weights of a local HF folder of `family` under our paths: safetensors (single or sharded), msgpack,
    or .bin. A name the family does not have is kept under its own name, for the merge to report."""
    if (folder / "model.safetensors").is_file():
        return _from_pt_names(family, _read_safetensors([folder / "model.safetensors"]))
    if (folder / "model.safetensors.index.json").is_file():
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        files = sorted({folder / f for f in index["weight_map"].values()})
        return _from_pt_names(family, _read_safetensors(files))
    if (folder / "flax_model.msgpack").is_file():
        from flax.serialization import msgpack_restore

        tree = msgpack_restore((folder / "flax_model.msgpack").read_bytes())
        out = {}
        for path, arr in flatten_dict(tree).items():
            # transformers' Flax module paths are its PyTorch names; only the leaves differ, and they are ours.
            *mods, leaf = path[1:] if path[0] == "params" else path
            name = ".".join(mods) + ".weight"
            if not family.is_ignored(name):
                module = (family.to_canonical(name) or name).split(".")[:-1]
                out[(*module, leaf)] = np.asarray(arr)
        return out
    if (folder / "pytorch_model.bin").is_file():
        return _from_pt_names(family, read_torch_bin(folder / "pytorch_model.bin"))
    raise WeightsError(f"{folder} has no model.safetensors, flax_model.msgpack or pytorch_model.bin; "
                       "point at a folder made by save_pretrained")


def _read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise WeightsError(f"{path} is a PyTorch pickle and reading it needs torch; install torch, or save the "
                           "model with safe_serialization=True (model.safetensors), which loads without it") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def _from_pt_names(family: Family, state: dict[str, np.ndarray]) -> dict[Path_, np.ndarray]:
    out = {}
    for name, arr in state.items():
        if family.is_ignored(name):
            continue
        ours = pt_to_flax(family, name)
        if ours is None:  # not a weight of this family: the merge names it as unexpected
            out[tuple(name.split("."))] = arr
            continue
        path, transpose = ours
        out[path] = np.ascontiguousarray(arr.T) if transpose and arr.ndim == 2 else arr
    return out


# ---------------------------------------------------------------------------------------------- merge
def new_allowed(family: Family) -> tuple[Path_, ...]:
    """The head: what a checkpoint may lack (a base model, or another label count): the classifier, and the
    dense layer where it belongs to the classification head (RoBERTa, ELECTRA, DistilBERT; ModernBERT's head,
    which its masked-LM checkpoints have and its base model lacks)."""
    return (HEAD, (family.head_path,)) if family.head_is_new else (HEAD,)


def merge(expected: dict[Path_, Any], loaded: dict[Path_, np.ndarray], fresh: dict[Path_, Any],
          pooling_uses_pooler: bool, allowed_new: tuple[Path_, ...] = (HEAD,), report: bool = True,
          ) -> dict[Path_, Any]:
    """Strict merge: every backbone weight from the checkpoint; only the head (`allowed_new`) may be missing or
    differently shaped, and then comes from `fresh` (HF's init). Anything else raises, naming it."""
    def is_new_allowed(path: Path_) -> bool:
        return any(path[: len(prefix)] == prefix for prefix in allowed_new)

    missing, misshaped, out = [], [], {}
    for path, spec in expected.items():
        arr = loaded.get(path)
        if arr is None or tuple(arr.shape) != tuple(spec.shape):
            if is_new_allowed(path):
                out[path] = fresh[path]
                continue
            if arr is None:
                missing.append("/".join(path))
            else:
                misshaped.append(f"{'/'.join(path)} {tuple(arr.shape)} != {tuple(spec.shape)}")
            continue
        out[path] = arr
    unexpected = sorted("/".join(p) for p in loaded if p not in expected
                        and not (p[: len(POOLER)] == POOLER and not pooling_uses_pooler))
    if missing or unexpected or misshaped:
        lines = [f"{label}: {', '.join(names)}" for label, names in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if names]
        raise WeightsError("the checkpoint does not match the model; " + "; ".join(lines))
    if report:
        report_fresh_head({p[:-1] for p in expected if is_new_allowed(p) and out[p] is fresh[p]})
    return out


def report_fresh_head(modules: Any) -> None:
    """Says which head modules a model starts with fresh (HF's init): the checkpoint had none of their shape."""
    if modules:
        log.info("classifier head initialized fresh (%s: normal(0, initializer_range), zero bias): the checkpoint "
                 "has no head of this shape", ", ".join(sorted("/".join(m) for m in modules)))


def from_pretrained(name_or_path: str, num_labels: int | None = None, *, label_names: tuple[str, ...] | None = None,
                    problem_type: str | None = None, pooling: str = HF_POOLING, classifier_dropout: Any = "hf",
                    dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, remat: bool = False,
                    seed: int = 0, impl: str = "fast") -> tuple[Classifier, dict]:
    """(model, params) from a packaged name, a local HF folder or a hub id.

    The checkpoint's own num_labels / id2label / problem_type / classifier_dropout are the defaults."""
    folder = assets.resolve_model(name_or_path)
    overrides: dict[str, Any] = {"pooling": pooling}
    if num_labels is not None:
        overrides["num_labels"] = num_labels
    if label_names is not None:
        overrides["label_names"] = tuple(label_names)
        overrides.setdefault("num_labels", len(label_names))
    if problem_type is not None:
        overrides["problem_type"] = problem_type
    if classifier_dropout != "hf":
        overrides["classifier_dropout"] = classifier_dropout
    model = make_classifier(classifier_config(folder, impl, **overrides), dtype=dtype, remat=remat, impl=impl)
    params = load_params(model, folder, jax.random.PRNGKey(seed))
    return model, cast_floats(params, param_dtype)


def classifier_config(folder: str | Path, impl: str = "fast", **overrides: Any) -> ClassifierConfig:
    """The classifier described by a folder's config.json, with `overrides` (num_labels, pooling, ...); `impl` is
    checked against its family (transformers' Flax backbone, impl=hf, is BERT's)."""
    try:
        config = ClassifierConfig.from_hf(read_hf_config(folder), **overrides)
    except (OSError, ValueError) as e:  # a config.json that is missing, unreadable, or of another model
        raise WeightsError(str(e)) from None
    try:
        config.backbone.family.check_impl(impl)
    except ValueError as e:
        raise WeightsError(f"{e} ({folder} is a {config.backbone.model_type} model)") from None
    return config


def load_params(model: Classifier, folder: str | Path, rng: jax.Array) -> dict:
    """The checkpoint in `folder` merged strictly onto `model`'s parameter tree, as host numpy arrays (with a
    fresh adapter where the model has one)."""
    return load_base(model, folder, rng)[0]


def load_base(model: Classifier, folder: str | Path, rng: jax.Array, report: bool = True,
              ) -> tuple[dict, tuple[Path_, ...]]:
    """load_params, and the head's modules that the checkpoint lacks (initialized fresh; said unless `report` is
    False, for a caller that may not use them)."""
    family = model.config.backbone.family
    expected = flatten_dict(jax.eval_shape(model.init, rng, **dummy_inputs())["params"])
    loaded = {p: a for p, a in read_checkpoint(Path(folder), family).items()
              if p in expected or not family.is_unused(".".join(p))}
    allowed = new_allowed(family)
    fresh = _init_head(expected, allowed, model.config.backbone.initializer_range, jax.random.fold_in(rng, 1))
    merged = merge(expected, loaded, fresh, pooling_uses_pooler=model.config.pooling == HF_POOLING,
                   allowed_new=allowed, report=report)
    new = tuple(sorted({p[:-1] for p in merged if p in fresh and merged[p] is fresh[p]}))
    variables = {"params": unflatten_dict({k: np.asarray(v, dtype=expected[k].dtype) for k, v in merged.items()})}
    variables = lora.add(variables, model.config.lora, jax.random.fold_in(rng, 2))
    return jax.tree.map(np.asarray, variables), new


def checkpoint_sha256(folder: str | Path) -> str:
    """One sha256 over a model folder's weight files (their names and bytes): what a LoRA run records of the base
    it adapts, so that a base whose weights changed is never silently used with its adapter."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + assets.sha256_file(f).encode())
    return h.hexdigest()


def _init_head(expected: dict[Path_, Any], allowed: tuple[Path_, ...], initializer_range: float,
               rng: jax.Array) -> dict[Path_, np.ndarray]:
    """The head's dense layers initialized as HF's _init_weights does (normal(0, initializer_range) kernels, zero
    biases), without initializing the backbone."""
    out = {}
    for path in (p for p in expected if any(p[: len(a)] == a for a in allowed)):
        shape = expected[path].shape
        if path[-1] != "kernel":  # biases 0, a norm's scale 1
            out[path] = np.full(shape, 1.0 if path[-1] == "scale" else 0.0, np.float32)
            continue
        # The classifier's kernel draws from `rng` itself (as before families had a second head layer, so a
        # BERT run starts from the same head); the dense layer before it from a key of its own.
        key = rng if path[: len(HEAD)] == HEAD else jax.random.fold_in(rng, 1)
        out[path] = np.asarray(jax.random.normal(key, shape)) * initializer_range
    return out


# ---------------------------------------------------------------------------------------------- export
def to_pt_state(params: dict, family: Family = FAMILIES["bert"]) -> dict[str, np.ndarray]:
    """Our params -> the family's PyTorch *ForSequenceClassification state dict (float32 numpy)."""
    state = {}
    for path, arr in flatten_dict(params["params"]).items():
        name, transpose = flax_to_pt(family, path)
        a = np.asarray(jax.device_get(arr), dtype=np.float32)
        state[name] = np.ascontiguousarray(a.T if transpose else a)
    return state


def export_hf(folder: str | Path, config: ClassifierConfig, params: dict, tokenizer_dir: str | Path | None) -> Path:
    """Writes config.json, model.safetensors (PyTorch names) and the tokenizer files: a folder that the family's
    *ForSequenceClassification.from_pretrained loads with no missing or unexpected keys."""
    from safetensors.numpy import save

    family = config.backbone.family
    if config.pooling != HF_POOLING:
        arch = family.architectures[config.backbone.model_type]
        raise WeightsError(f"pooling={config.pooling!r} has no PyTorch {arch} equivalent (it always uses its "
                           f"{family.head_names}); export needs pooling=cls_pooler")
    hf = config.to_hf()

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        # Serialized in memory and written by Python, so a full disk is an OSError like any other file's.
        (tmp / "model.safetensors").write_bytes(save(to_pt_state(params, family), metadata={"format": "pt"}))
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.is_file():
                    shutil.copyfile(src, tmp / name)

    return outputs.write_folder(folder, write, EXPORT_FILES)
