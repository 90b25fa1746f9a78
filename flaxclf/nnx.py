"""The classifier as a `flax.nnx` module, for code written in NNX.

It wraps the linen classifier (`BertClassifier`, `ModernBertClassifier`) with `flax.nnx.bridge.ToNNX` rather than
re-implementing it: one encoder (parity-tested against PyTorch) serves both faces, so the two can't drift, and the
wrapper compiles to the same XLA program. Its parameters keep the linen tree, so checkpoints, the sharding rules
and the HF export apply unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
from flax import nnx
from flax.nnx import bridge

from flaxclf.hf.weights import export_hf, from_pretrained
from flaxclf.models.classifier import dummy_inputs
from flaxclf.models.interface import Classifier


def to_nnx(model: Classifier, params: dict, seed: int = 0) -> bridge.ToNNX:
    """An NNX module holding `params` ({"params": ...} of `model`); its dropout draws from nnx.Rngs(seed)."""
    module = bridge.ToNNX(model, rngs=nnx.Rngs(seed))
    bridge.lazy_init(module, **dummy_inputs())
    state = nnx.state(module, nnx.Param)
    nnx.replace_by_pure_dict(state, params["params"])
    nnx.update(module, state)
    return module


def params_of(module: nnx.Module) -> dict:
    """The module's parameters as linen's {"params": ...}: for the linen module's `apply`, checkpoints or export."""
    return {"params": nnx.to_pure_dict(nnx.state(module, nnx.Param))}


def nnx_from_pretrained(folder: str | Path, seed: int = 0, **kwargs: Any) -> tuple[Classifier, bridge.ToNNX]:
    """`flaxclf.from_pretrained` (same arguments) as an NNX module; returns (the linen model, the NNX module)."""
    model, params = from_pretrained(folder, seed=seed, **kwargs)
    return model, to_nnx(model, params, seed)


def export_nnx(folder: str | Path, model: Classifier, module: nnx.Module, tokenizer_dir: str | Path | None) -> Path:
    """Writes the NNX module's weights as a Hugging Face folder, through the same path as the linen export."""
    return export_hf(folder, model.config, jax.device_get(params_of(module)), tokenizer_dir)
