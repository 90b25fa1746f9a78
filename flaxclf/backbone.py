"""BERT's config as flaxclf reads and writes it (config.json, no transformers needed), and the one adapter to
transformers' Flax modules, imported only when model.impl=hf asks for them."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# The last transformers line with Flax BERT (model.impl=hf, the reference the fast encoder is tested against).
HF_FLAX_MAJOR = 4


def transformers_version() -> str | None:
    """The installed transformers' version, read without importing it (None when it is not installed)."""
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def hf_flax_problem() -> str | None:
    """Why transformers' FlaxBertModule can't be used here, in one sentence; None when it can."""
    version = transformers_version()
    if version is None:
        return "model.impl=hf needs transformers 4.x (its Flax BERT); it is not installed: use model.impl=fast"
    if int(version.split(".")[0]) > HF_FLAX_MAJOR:
        return (f"model.impl=hf needs transformers 4.x (Flax was removed in v5.0) but {version} is installed; use "
                "model.impl=fast, or pip install 'transformers<5'")
    return None


def hf_flax_bert_module() -> type:
    """transformers' FlaxBertModule, imported on first use: only model.impl=hf needs it."""
    problem = hf_flax_problem()
    if problem is not None:
        raise ImportError(problem)
    with warnings.catch_warnings():  # its notice that Flax is deprecated is known (see HF_FLAX_MAJOR)
        warnings.simplefilter("ignore")
        logger = logging.getLogger("transformers")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            from transformers.models.bert.modeling_flax_bert import FlaxBertModule
        finally:
            logger.setLevel(level)
    return FlaxBertModule


@dataclass(frozen=True)
class BertSpec:
    """The shape and regularization of a BERT encoder: the fields of HF's BertConfig that the math uses."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> BertSpec:
        """From a config.json's fields; a field it leaves out takes BertConfig's default, as transformers does."""
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type={hf['position_embedding_type']!r} is not supported; "
                             "flaxclf's BERT has absolute position embeddings only")
        return cls(**{k: hf.get(k, v) for k, v in asdict(cls()).items()})

    def to_hf(self, **extra: Any) -> dict[str, Any]:
        """The fields of a config.json that transformers' BertConfig reads as this encoder."""
        return {"model_type": "bert", **asdict(self), "position_embedding_type": "absolute", **extra}

    def to_hf_config(self, **extra: Any):
        """A transformers.BertConfig (transformers is imported here: only its own models need one)."""
        import transformers

        return transformers.BertConfig(**{k: v for k, v in self.to_hf(**extra).items() if k != "model_type"})


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """config.json of a local HF folder; other model types are refused with the type named."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; point at a Hugging Face model folder")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); save the model again with save_pretrained") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path} holds a {type(hf).__name__}, not a config object")
    model_type = hf.get("model_type", "bert")
    if model_type != "bert":
        raise ValueError(f"{path} is a {model_type!r} model; flaxclf loads BERT checkpoints (model_type 'bert')")
    return hf
