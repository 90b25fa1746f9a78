"""An encoder's config as flaxclf reads and writes it (config.json, no transformers needed), and the one adapter to
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

from flaxclf.families import MODEL_TYPES, Family, family_of

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
    """The shape and regularization of an encoder: the fields of HF's configs that the math uses. model_type
    picks the family (flaxclf.families): what its embeddings, layers and head do differently from BERT's."""

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
    model_type: str = "bert"
    embedding_size: int | None = None  # ELECTRA, ALBERT: the factorized embedding width (None: hidden_size)
    num_hidden_groups: int = 1  # ALBERT: weight sets shared by the num_hidden_layers positions

    def __post_init__(self):
        if family_of(self.model_type).encoder != "bert":  # family_of raises, naming the supported types
            raise ValueError(f"model_type {self.model_type!r} is not a BERT-like encoder; use spec_from_hf")
        if self.num_hidden_layers % self.num_hidden_groups:
            raise ValueError(f"num_hidden_groups {self.num_hidden_groups} does not divide num_hidden_layers "
                             f"{self.num_hidden_layers}")

    @property
    def family(self) -> Family:
        return family_of(self.model_type)

    @property
    def embedding_width(self) -> int:
        return self.hidden_size if self.embedding_size is None else self.embedding_size

    @property
    def projects_embeddings(self) -> bool:
        how = self.family.embedding_project
        return how == "always" or (how == "if_smaller" and self.embedding_width != self.hidden_size)

    @property
    def max_length(self) -> int:
        """The longest input: RoBERTa's positions start after padding_idx, so pad_token_id + 1 rows are unused."""
        offset = self.pad_token_id + 1 if self.family.positions_from_padding else 0
        return self.max_position_embeddings - offset

    def layer_params(self) -> list[int]:
        """The weight set each layer position uses: its own, or ALBERT's group int(i / (layers / groups))."""
        n, g = self.num_hidden_layers, self.num_hidden_groups
        return [int(i / (n / g)) for i in range(n)] if self.family.shared_layers else list(range(n))

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> BertSpec:
        """From a config.json's fields; a field it leaves out takes its config class's default, as transformers
        does. Variants of a family that flaxclf does not compute are refused, naming the setting."""
        model_type = hf.get("model_type", "bert")
        family = family_of(model_type)
        refused = {"position_embedding_type": "absolute", "sinusoidal_pos_embds": False, "inner_group_num": 1}
        for key, supported in refused.items():
            if hf.get(key, supported) != supported:
                raise ValueError(f"{key}={hf[key]!r} is not supported; flaxclf's {family.name} has {key}="
                                 f"{supported!r} only")
        defaults = {**asdict(cls()), **family.defaults_for(model_type), "model_type": model_type}
        fields = {k: hf.get(family.hf_key(k), v) for k, v in defaults.items() if k != "model_type"}
        if family.embedding_project == "never":
            fields["embedding_size"] = None
        return cls(**fields, model_type=model_type)

    def to_hf(self, **extra: Any) -> dict[str, Any]:
        """The fields of a config.json that transformers' config class for model_type reads as this encoder."""
        family = self.family
        skip = {"model_type", *family.unused}
        if family.embedding_project == "never":
            skip.add("embedding_size")
        if not family.shared_layers:
            skip.add("num_hidden_groups")
        out = {family.hf_key(k): v for k, v in asdict(self).items() if k not in skip}
        if family.embedding_project != "never":
            out["embedding_size"] = self.embedding_width
        if family.position_embedding_type:
            out["position_embedding_type"] = "absolute"
        return {"model_type": self.model_type, **out, **extra}

    def to_hf_config(self, **extra: Any):
        """The transformers config object of model_type (transformers is imported here: only its models need one)."""
        import transformers

        return transformers.AutoConfig.for_model(**self.to_hf(**extra))


def spec_from_hf(hf: Mapping[str, Any]):
    """The encoder spec of a config.json: a BertSpec, or for ModernBERT a flaxclf.modernbert.ModernBertSpec."""
    if family_of(hf.get("model_type", "bert")).encoder == "modernbert":
        from flaxclf.modernbert import ModernBertSpec

        return ModernBertSpec.from_hf(hf)
    return BertSpec.from_hf(hf)


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
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{path} is a {model_type!r} model; flaxclf loads {', '.join(sorted(MODEL_TYPES))}")
    return hf
