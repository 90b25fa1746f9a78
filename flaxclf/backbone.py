"""The one adapter to transformers: BERT's Flax modules and its config. Another backbone would replace this file."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# transformers warns on import of its Flax modules that Flax is deprecated: a known fact (Flax was removed in
# transformers v5, hence the <5 pin), so the notice is silenced for that one import.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# transformers imports torch eagerly whenever it is installed (seconds and hundreds of MB for nothing here).
# flaxclf never uses torch, so unless the user said otherwise it is kept out; set USE_TORCH=1, or import
# transformers before flaxclf, to use transformers' PyTorch models in the same process.
os.environ.setdefault("USE_TORCH", "0")

import transformers  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    _tf_logger = logging.getLogger("transformers")
    _level = _tf_logger.level
    _tf_logger.setLevel(logging.ERROR)
    from transformers.models.bert.modeling_flax_bert import FlaxBertModule, FlaxBertPooler  # noqa: E402
    _tf_logger.setLevel(_level)

__all__ = ["BertSpec", "FlaxBertModule", "FlaxBertPooler", "read_hf_config", "transformers_version"]

transformers_version = transformers.__version__


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
    def from_hf_config(cls, hf: transformers.BertConfig) -> BertSpec:
        if getattr(hf, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type={hf.position_embedding_type!r} is not supported; "
                             "flaxclf's Flax BERT backbone has absolute position embeddings only")
        return cls(**{k: getattr(hf, k) for k in asdict(cls()).keys()})

    def to_hf_config(self, **extra: Any) -> transformers.BertConfig:
        return transformers.BertConfig(**asdict(self), **extra)


def read_hf_config(folder: str | Path) -> transformers.BertConfig:
    """config.json of a local HF folder as a BertConfig; other model types are refused with the type named."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; point at a Hugging Face model folder")
    hf = transformers.BertConfig.from_json_file(str(path))
    model_type = getattr(hf, "model_type", "bert")
    if model_type != "bert":
        raise ValueError(f"{path} is a {model_type!r} model; flaxclf loads BERT checkpoints (model_type 'bert')")
    return hf
