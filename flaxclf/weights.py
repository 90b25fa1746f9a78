"""Hugging Face checkpoints <-> flaxclf params: PyTorch/Flax names, a strict merge, export to HF's format."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from flaxclf import files
from flaxclf.backbone import read_hf_config
from flaxclf.model import BertClassifier, ClassifierConfig, cast_floats, dummy_inputs
from flaxclf.vocab import HF_POOLING

log = logging.getLogger("flaxclf")

Path_ = tuple[str, ...]
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
EXPORT_FILES = frozenset({"config.json", "model.safetensors", *TOKENIZER_FILES})  # all an export may write
HEAD = ("classifier",)
POOLER = ("pooler",)


class WeightsError(ValueError):
    """A checkpoint that does not fit the model; the message lists the names."""


# ---------------------------------------------------------------------------------------------- names
def _is_ignored_pt(name: str) -> bool:
    # Buffers (position_ids) and other tasks' heads (BertForPreTraining's cls.*) are not weights of ours.
    return name.endswith("position_ids") or name.endswith("token_type_ids") or name.startswith("cls.")


def pt_to_flax(name: str) -> tuple[Path_, bool]:
    """PyTorch state-dict name -> (our param path, whether the tensor is a transposed Linear weight)."""
    parts = name.split(".")
    if parts[0] == "bert":
        parts = parts[1:]
    *mods, leaf = parts
    if leaf in ("bias", "beta"):
        return _place(mods) + ("bias",), False
    if "LayerNorm" in mods[-1:] or leaf == "gamma":
        return _place(mods) + ("scale",), False
    if mods[-1].endswith("embeddings"):
        return _place(mods) + ("embedding",), False
    return _place(mods) + ("kernel",), True


def _place(mods: list[str]) -> Path_:
    if mods[0] in ("pooler", "classifier"):
        return tuple(mods)
    return ("bert",) + tuple(mods)


def flax_to_pt(path: Path_) -> tuple[str, bool]:
    """Our param path -> (PyTorch BertForSequenceClassification name, whether to transpose)."""
    *mods, leaf = path
    mods = mods[1:] if mods[0] == "bert" else mods
    prefix = "" if mods[0] == "classifier" else "bert."
    pt_leaf = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}[leaf]
    return prefix + ".".join(mods + [pt_leaf]), leaf == "kernel"


def _hf_flax_to_ours(path: Path_) -> Path_:
    """Paths of transformers' Flax checkpoints (FlaxBertModel or FlaxBert*For*) -> ours."""
    if path[0] == "params":
        path = path[1:]
    if path[0] == "bert":
        path = path[1:]
    return path if path[0] in ("pooler", "classifier") else ("bert",) + path


# ---------------------------------------------------------------------------------------------- reading
def read_checkpoint(folder: Path) -> dict[Path_, np.ndarray]:
    """The weights of a local HF folder under our paths: safetensors (single or sharded), msgpack, or .bin."""
    if (folder / "model.safetensors").is_file():
        return _from_pt_names(_read_safetensors([folder / "model.safetensors"]))
    if (folder / "model.safetensors.index.json").is_file():
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        files = sorted({folder / f for f in index["weight_map"].values()})
        return _from_pt_names(_read_safetensors(files))
    if (folder / "flax_model.msgpack").is_file():
        from flax.serialization import msgpack_restore

        tree = msgpack_restore((folder / "flax_model.msgpack").read_bytes())
        return {_hf_flax_to_ours(k): np.asarray(v) for k, v in flatten_dict(tree).items()}
    if (folder / "pytorch_model.bin").is_file():
        return _from_pt_names(_read_torch_bin(folder / "pytorch_model.bin"))
    raise WeightsError(f"{folder} has no model.safetensors, flax_model.msgpack or pytorch_model.bin; "
                       "point at a folder made by save_pretrained")


def _read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise WeightsError(f"{path} is a PyTorch pickle and reading it needs torch; install torch, or save the "
                           "model with safe_serialization=True (model.safetensors), which loads without it") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def _from_pt_names(state: dict[str, np.ndarray]) -> dict[Path_, np.ndarray]:
    out = {}
    for name, arr in state.items():
        if _is_ignored_pt(name):
            continue
        path, transpose = pt_to_flax(name)
        out[path] = np.ascontiguousarray(arr.T) if transpose and arr.ndim == 2 else arr
    return out


# ---------------------------------------------------------------------------------------------- merge
def merge(expected: dict[Path_, Any], loaded: dict[Path_, np.ndarray], fresh: dict[Path_, Any],
          pooling_uses_pooler: bool) -> dict[Path_, Any]:
    """Strict merge: every backbone and pooler weight from the checkpoint; only the classifier head may be
    missing or differently shaped, and then comes from `fresh` (HF's init). Anything else raises, naming it."""
    missing, misshaped, out = [], [], {}
    for path, spec in expected.items():
        arr = loaded.get(path)
        if arr is None or tuple(arr.shape) != tuple(spec.shape):
            if path[: len(HEAD)] == HEAD:
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
    head_new = [p for p in expected if p[: len(HEAD)] == HEAD and out[p] is fresh[p]]
    if head_new:
        log.info("classifier head initialized fresh (normal(0, initializer_range), zero bias): "
                 "the checkpoint has no head of this shape")
    return out


def from_pretrained(name_or_path: str, num_labels: int | None = None, *, label_names: tuple[str, ...] | None = None,
                    problem_type: str | None = None, pooling: str = HF_POOLING, classifier_dropout: Any = "hf",
                    dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, remat: bool = False,
                    seed: int = 0, impl: str = "fast") -> tuple[BertClassifier, dict]:
    """(model, params) from a packaged name, a local HF folder or a hub id.

    The checkpoint's own num_labels / id2label / problem_type / classifier_dropout are the defaults."""
    from flaxclf.assets import resolve_model

    folder = resolve_model(name_or_path)
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
    model = BertClassifier(classifier_config(folder, **overrides), dtype=dtype, remat=remat, impl=impl)
    params = load_params(model, folder, jax.random.PRNGKey(seed))
    return model, cast_floats(params, param_dtype)


def classifier_config(folder: str | Path, **overrides: Any) -> ClassifierConfig:
    """The classifier described by a folder's config.json, with `overrides` (num_labels, pooling, ...)."""
    try:
        return ClassifierConfig.from_hf(read_hf_config(folder), **overrides)
    except (OSError, ValueError) as e:  # a config.json that is missing, unreadable, or of another model
        raise WeightsError(str(e)) from None


def load_params(model: BertClassifier, folder: str | Path, rng: jax.Array) -> dict:
    """The checkpoint in `folder` merged strictly onto `model`'s parameter tree, as host numpy arrays."""
    loaded = read_checkpoint(Path(folder))
    expected = flatten_dict(jax.eval_shape(model.init, rng, **dummy_inputs())["params"])
    head_rng = jax.random.fold_in(rng, 1)
    fresh = flatten_dict(jax.device_get(_init_head(model, head_rng)))
    merged = merge(expected, loaded, {HEAD + k: v for k, v in fresh.items()},
                   pooling_uses_pooler=model.config.pooling == HF_POOLING)
    return {"params": unflatten_dict({k: np.asarray(v, dtype=expected[k].dtype) for k, v in merged.items()})}


def _init_head(model: BertClassifier, rng: jax.Array) -> dict:
    """The classifier's init as HF does it (normal(0, initializer_range), zero bias), without the backbone."""
    cfg = model.config
    kernel = jax.random.normal(rng, (cfg.backbone.hidden_size, cfg.num_labels)) * cfg.backbone.initializer_range
    return {"kernel": kernel, "bias": jnp.zeros((cfg.num_labels,))}


# ---------------------------------------------------------------------------------------------- export
def to_pt_state(params: dict) -> dict[str, np.ndarray]:
    """Our params -> PyTorch BertForSequenceClassification state dict (float32 numpy)."""
    state = {}
    for path, arr in flatten_dict(params["params"]).items():
        name, transpose = flax_to_pt(path)
        a = np.asarray(jax.device_get(arr), dtype=np.float32)
        state[name] = np.ascontiguousarray(a.T if transpose else a)
    return state


def export_hf(folder: str | Path, config: ClassifierConfig, params: dict, tokenizer_dir: str | Path | None) -> Path:
    """Writes config.json, model.safetensors (PyTorch names) and the tokenizer files: a folder that
    BertForSequenceClassification.from_pretrained loads with no missing or unexpected keys."""
    from safetensors.numpy import save

    if config.pooling != HF_POOLING:
        raise WeightsError(f"pooling={config.pooling!r} has no PyTorch BertForSequenceClassification equivalent "
                           "(it always uses the tanh pooler); export needs pooling=cls_pooler")
    hf = config.to_hf()

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        # Serialized in memory and written by Python, so a full disk is an OSError like any other file's.
        (tmp / "model.safetensors").write_bytes(save(to_pt_state(params), metadata={"format": "pt"}))
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.is_file():
                    shutil.copyfile(src, tmp / name)

    return files.write_folder(folder, write, EXPORT_FILES)
