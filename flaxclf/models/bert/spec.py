"""The BERT-like encoders' config: the fields of HF's BertConfig (and its families' configs) that the math uses,
read from and written to config.json without transformers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from flaxclf.models.bert.families import MODEL_TYPES
from flaxclf.models.family import Family


@dataclass(frozen=True)
class BertSpec:
    """The shape and regularization of an encoder: the fields of HF's configs that the math uses. model_type
    picks the family (flaxclf.models.bert.families): what its embeddings, layers and head do differently from BERT's."""

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
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not a BERT-like encoder ({', '.join(MODEL_TYPES)}); "
                             "flaxclf.models.registry.spec_from_hf reads any config.json flaxclf loads")
        if self.num_hidden_layers % self.num_hidden_groups:
            raise ValueError(f"num_hidden_groups {self.num_hidden_groups} does not divide num_hidden_layers "
                             f"{self.num_hidden_layers}")

    @property
    def family(self) -> Family:
        return MODEL_TYPES[self.model_type]

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
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not a BERT-like encoder ({', '.join(MODEL_TYPES)})")
        family = MODEL_TYPES[model_type]
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

    def with_pooling(self, pooling: str) -> tuple[BertSpec, str]:
        return self, pooling

    def pooling_label(self, pooling: str) -> str:
        return pooling
